// Watches an execution the way a web page does: headless Chromium opens a page of the server
// (same origin as the API), then an EventSource on the execution's event stream with the
// access token in the query (EventSource cannot send headers). Prints `ready` once the page is
// loaded, reads the execution id from stdin, and prints the events it received, up to and
// including the one that shows the execution finished, as one JSON array on the next line.
//
//   node tests/browser/watch-events.mjs <base-url> <access-token>
import { createInterface } from 'node:readline';
import { chromium } from 'playwright-core';

const [baseUrl, token] = process.argv.slice(2);
const FINAL = ['SUCCEEDED', 'FAILED', 'CANCELLED', 'TIMED_OUT'];

const browser = await chromium.launch({
  executablePath: process.env.TURBOCAT_CHROMIUM || '/usr/bin/chromium',
  args: ['--no-sandbox', '--disable-gpu', '--disable-background-networking'],
});
try {
  const page = await browser.newPage();
  await page.goto(`${baseUrl}/docs`);
  process.stdout.write('ready\n');
  const lines = createInterface({ input: process.stdin });
  const executionId = (await lines[Symbol.asyncIterator]().next()).value.trim();
  lines.close();
  const events = await page.evaluate(
    ({ executionId, token, final }) =>
      new Promise((resolve, reject) => {
        const received = [];
        const url = `/api/v1/executions/${executionId}/events?access_token=${encodeURIComponent(token)}`;
        const source = new EventSource(url);
        const timer = setTimeout(() => {
          source.close();
          reject(new Error(`no end within 60 s: ${JSON.stringify(received).slice(0, 2000)}`));
        }, 60000);
        source.onmessage = (message) => {
          const event = JSON.parse(message.data);
          received.push(event);
          // The server ends the stream once the execution finished (a finished one: right after
          // its snapshot); EventSource would reconnect, so close it.
          const status = (event.executionChanged ?? event.snapshot)?.status;
          if (final.includes(status)) {
            clearTimeout(timer);
            source.close();
            resolve(received);
          }
        };
        source.addEventListener('error', (event) => {
          if (event.data) {
            clearTimeout(timer);
            source.close();
            reject(new Error(`the stream failed: ${event.data}`));
          }
        });
      }),
    { executionId, token, final: FINAL },
  );
  process.stdout.write(`${JSON.stringify(events)}\n`);
} finally {
  await browser.close();
}
