// The console's journeys in headless Chromium against a real server (tests/console drives this
// once per journey). Every journey also checks the page itself: it talks grpc-web only (every
// call to the server is a POST of application/grpc-web+proto, never /api/…), it logs no
// console error, and it leaves a screenshot of every page it visits in the screenshot folder.
// Prints one JSON line {"ok":true,"grpcWebCalls":N,…} or exits non-zero with the reason.
//
//   node tests/browser/console.mjs <base-url> <journey> <screenshot-folder>
import { execFileSync } from 'node:child_process';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { chromium } from 'playwright-core';

const [baseUrl, journey, screenshotFolder] = process.argv.slice(2);
// Screenshots are named after the journey (and the mode, when one journey runs in two).
const prefix = process.env.TURBOCAT_CONSOLE_SCREENSHOT_PREFIX || journey;
const TIMEOUT = 60_000;
const PASSWORD = 'correct horse battery staple 9';

mkdirSync(screenshotFolder, { recursive: true });
const browser = await chromium.launch({
  executablePath: process.env.TURBOCAT_CHROMIUM || '/usr/bin/chromium',
  args: ['--no-sandbox', '--disable-gpu', '--disable-background-networking'],
});
const problems = [];
const wire = { grpcWeb: 0, methods: new Set() };
let shots = 0;

function fail(message) {
  throw new Error(message);
}

function expect(condition, message) {
  if (!condition) fail(message);
}

async function newPage(context) {
  const page = await context.newPage();
  page.setDefaultTimeout(TIMEOUT);
  page.on('console', (message) => {
    if (message.type() === 'error') problems.push(`console error: ${message.text()}`);
  });
  page.on('pageerror', (error) => problems.push(`page error: ${error.message}`));
  page.on('dialog', (dialog) => void dialog.accept());
  page.on('request', (request) => {
    const url = new URL(request.url());
    if (url.origin !== baseUrl) return;
    if (url.pathname.startsWith('/api/')) problems.push(`REST call from the page: ${request.method()} ${url.pathname}`);
    if (request.method() !== 'POST') return;
    const contentType = request.headers()['content-type'] ?? '';
    if (!/^application\/grpc-web(\+proto|\+json)?$/.test(contentType)) {
      problems.push(`a call that is not grpc-web: ${url.pathname} (${contentType})`);
    } else {
      wire.grpcWeb += 1;
      wire.methods.add(url.pathname);
    }
  });
  page.on('response', (response) => {
    const url = new URL(response.url());
    if (url.origin !== baseUrl || response.request().method() !== 'POST') return;
    const contentType = response.headers()['content-type'] ?? '';
    if (!contentType.startsWith('application/grpc-web')) {
      problems.push(`an answer that is not grpc-web: ${url.pathname} (${contentType})`);
    }
  });
  return page;
}

/** A screenshot of the page as it is now, at desktop width and, once per journey, phone width. */
async function shot(page, name) {
  shots += 1;
  const file = join(screenshotFolder, `${prefix}-${String(shots).padStart(2, '0')}-${name.replace(/\W+/g, '-')}.png`);
  await page.screenshot({ path: file, fullPage: true });
}

async function register(page, email) {
  await page.goto(`${baseUrl}/register`);
  await page.getByRole('heading', { name: 'Register' }).waitFor();
  await page.getByLabel('Full name').fill('Console Tester');
  await page.getByLabel('Email').fill(email);
  await page.getByLabel('Password').fill(PASSWORD);
  await shot(page, 'register');
  await page.getByRole('button', { name: 'Register' }).click();
  await page.getByRole('heading', { name: 'Dashboard' }).waitFor();
}

/** Registers a new account, or signs in to the one the test made (TURBOCAT_CONSOLE_EMAIL). */
async function start(page, number) {
  const email = process.env.TURBOCAT_CONSOLE_EMAIL;
  if (!email) return register(page, `journey${number}-${Date.now()}@example.com`);
  await page.goto(`${baseUrl}/signin`);
  await page.getByLabel('Email').fill(email);
  await page.getByLabel('Password').fill(process.env.TURBOCAT_CONSOLE_PASSWORD ?? '');
  await shot(page, 'sign-in');
  await page.getByRole('button', { name: 'Sign in' }).click();
  await page.getByRole('heading', { name: 'Dashboard' }).waitFor();
}

async function go(page, label, heading) {
  await page.getByRole('navigation', { name: 'main' }).getByRole('link', { name: label, exact: true }).click();
  await page.getByRole('heading', { name: heading ?? label, exact: true }).waitFor();
}

async function createAgent(page, { name, type, fill }) {
  await go(page, 'Agents');
  await page.getByRole('button', { name: 'New agent' }).click();
  const form = page.getByRole('form', { name: 'agent form' });
  await form.getByLabel('Name').fill(name);
  await form.getByLabel('Type').selectOption({ label: type });
  if (fill) await fill(form);
  await form.getByRole('button', { name: 'Create' }).click();
  await form.waitFor({ state: 'detached' });
  await page.locator(`tr[data-agent="${name}"]`).waitFor();
}

async function pythonAgent(page, name, source) {
  await createAgent(page, {
    name,
    type: 'CODE',
    fill: async (form) => {
      await form.getByLabel('Language').selectOption({ label: 'Python' });
      await form.getByLabel('Source').fill(source);
    },
  });
}

async function jqAgent(page, name, program) {
  await createAgent(page, {
    name,
    type: 'DATA',
    fill: (form) => form.getByLabel('jq program').fill(program),
  });
}

/** Creates a workflow from [{key, agent, dependsOn, inputMapping, maxAttempts}]; returns its id. */
async function createWorkflow(page, name, steps) {
  await go(page, 'Workflows');
  await page.getByRole('link', { name: 'New workflow' }).click();
  const form = page.getByRole('form', { name: 'workflow form' });
  await form.getByLabel('Name', { exact: true }).fill(name);
  for (let index = 0; index < steps.length; index += 1) {
    if (index > 0) await form.getByRole('button', { name: 'Add step' }).click();
    const row = form.locator(`[data-step-index="${index}"]`);
    const step = steps[index];
    await row.getByLabel('Key').fill(step.key);
    await row.getByLabel('Agent').selectOption({ label: step.agent });
    if (step.dependsOn) await row.getByLabel('Depends on').fill(step.dependsOn);
    if (step.inputMapping) await row.getByLabel('Input mapping (JSON)').fill(JSON.stringify(step.inputMapping));
    if (step.maxAttempts) await row.getByLabel('Max attempts').fill(String(step.maxAttempts));
  }
  await form.getByRole('button', { name: 'Create' }).click();
  await page.getByRole('heading', { name, exact: true }).waitFor();
  await page.locator('svg.dag g.node').first().waitFor();
  return page.url().split('/').pop();
}

async function execute(page, input) {
  const form = page.getByRole('form', { name: 'execute' });
  await form.getByLabel('Input (JSON)').fill(JSON.stringify(input));
  await form.getByRole('button', { name: 'Execute' }).click();
  await page.waitForURL(/\/executions\/[0-9a-f-]+$/);
  return page.url().split('/').pop();
}

async function waitForStatus(page, status) {
  await page.locator(`[data-testid="execution-status"]:text-is("${status}")`).waitFor({ timeout: 90_000 });
}

/** At phone size: the page itself never scrolls sideways (wide content scrolls in its own box). */
async function fitsThePhone(page, name) {
  await page.waitForLoadState('networkidle');
  const widths = await page.evaluate(() => ({
    scroll: document.documentElement.scrollWidth,
    inner: window.innerWidth,
    widest: [...document.querySelectorAll('body *')]
      .filter((element) => element.getBoundingClientRect().right > window.innerWidth + 1)
      .slice(0, 5)
      .map((element) => `${element.tagName.toLowerCase()}.${element.className}`),
  }));
  expect(widths.scroll <= widths.inner, `${name} scrolls sideways at ${widths.inner} px: ${JSON.stringify(widths)}`);
  await shot(page, name);
}

/** The element that has the keyboard focus: what it is, and whether its focus can be seen. */
function focused(page) {
  return page.evaluate(() => {
    const element = document.activeElement;
    if (!element || element === document.body) return null;
    const style = getComputedStyle(element);
    return {
      tag: element.tagName.toLowerCase(),
      role: element.getAttribute('role'),
      text: (element.getAttribute('aria-label') || element.labels?.[0]?.innerText || element.innerText || '').trim(),
      visible: (style.outlineStyle !== 'none' && parseFloat(style.outlineWidth) > 0) || style.boxShadow !== 'none',
      focusVisible: element.matches(':focus-visible'),
    };
  });
}

const CONTROLS = ['a', 'button', 'input', 'select', 'textarea', 'summary'];

/** Presses Tab (or Shift+Tab) until the focus is on `tag` whose text starts with `text`; every
 *  stop on the way is a real control whose focus is visible. */
async function tabTo(page, tag, text, { back = false, limit = 40 } = {}) {
  for (let presses = 0; presses < limit; presses += 1) {
    await page.keyboard.press(back ? 'Shift+Tab' : 'Tab');
    const now = await focused(page);
    if (!now) continue;
    expect(CONTROLS.includes(now.tag), `the focus stopped on a ${now.tag} (${now.text}): only real controls take it`);
    expect(now.focusVisible && now.visible, `the focus on ${now.tag} "${now.text}" is not visible: ${JSON.stringify(now)}`);
    if (now.tag === tag && now.text.startsWith(text)) return now;
  }
  fail(`no ${tag} "${text}" within ${limit} presses of ${back ? 'Shift+Tab' : 'Tab'}`);
}

/** Every element the page listens to for clicks or keys is a real control (no clickable divs):
 *  the init script below records each element that gets such a listener. */
async function noClickableDivs(page) {
  const others = await page.evaluate((controls) =>
    (window.__listened ?? [])
      .filter((element) => element.isConnected && !controls.includes(element.tagName.toLowerCase()))
      .map((element) => element.outerHTML.slice(0, 80)),
  CONTROLS.concat(['form']));
  expect(others.length === 0, `click or key handlers on elements that are not controls: ${others.join(' | ')}`);
}

function recordListeners() {
  window.__listened = [];
  const add = EventTarget.prototype.addEventListener;
  EventTarget.prototype.addEventListener = function (type, ...rest) {
    if (this instanceof Element && /^(click|mousedown|mouseup|pointerdown|pointerup|keydown|keyup|keypress)$/.test(type)) {
      window.__listened.push(this);
    }
    return add.call(this, type, ...rest);
  };
}

const journeys = {
  // 1. Register, sign out, sign in; a wrong password shows the server's message.
  async sign_in(context) {
    const page = await newPage(context);
    const email = `journey1-${Date.now()}@example.com`;
    await register(page, email);
    await shot(page, 'dashboard');
    await page.getByRole('button', { name: 'Sign out' }).click();
    await page.getByRole('heading', { name: 'Sign in' }).waitFor();
    expect(new URL(page.url()).pathname === '/signin', `signed out to ${page.url()}`);
    await page.getByLabel('Email').fill(email);
    await page.getByLabel('Password').fill('not the password');
    await page.getByRole('button', { name: 'Sign in' }).click();
    const refusal = page.getByRole('alert');
    await refusal.waitFor();
    const text = await refusal.innerText();
    expect(text.includes('invalid email or password'), `the refusal shows the server's message: ${text}`);
    expect(text.includes('(UNAUTHORIZED)'), `and its code: ${text}`);
    await shot(page, 'wrong-password');
    await page.getByLabel('Password').fill(PASSWORD);
    await page.getByRole('button', { name: 'Sign in' }).click();
    await page.getByRole('heading', { name: 'Dashboard' }).waitFor();
    expect((await page.locator('.who').innerText()) === email, 'signed in as the user');
    // A reload keeps the session; a client route loads the console from the server.
    await page.goto(`${baseUrl}/workflows`);
    await page.getByRole('heading', { name: 'Workflows' }).waitFor();
    await shot(page, 'reloaded');
    // The session refreshes its access token before it expires: make it expire in 12 s, reload,
    // and the page asks for a new one (RefreshToken over grpc-web) without being asked.
    const before = await page.evaluate(() => {
      const session = JSON.parse(localStorage.getItem('turbocat.session'));
      session.expiresAt = Date.now() + 12_000;
      localStorage.setItem('turbocat.session', JSON.stringify(session));
      return session.accessToken;
    });
    const refreshed = page.waitForResponse((response) => response.url().endsWith('/turbocat.v1.AuthService/RefreshToken'), { timeout: 20_000 });
    await page.reload();
    await page.getByRole('heading', { name: 'Workflows' }).waitFor();
    await refreshed;
    await page.waitForFunction(
      (old) => JSON.parse(localStorage.getItem('turbocat.session')).accessToken !== old,
      before,
    );
    const after = await page.evaluate(() => JSON.parse(localStorage.getItem('turbocat.session')));
    expect(after.expiresAt - Date.now() > 60_000, `a fresh token: ${after.expiresAt - Date.now()} ms left`);
    await page.getByRole('link', { name: 'Agents', exact: true }).click();
    await page.getByRole('heading', { name: 'Agents' }).waitFor();
    expect((await page.getByRole('alert').count()) === 0, 'calls work with the new token');
  },

  // 2. An agent of each type the page offers and a workflow of two of them; the DAG is drawn;
  //    a stale edit is refused as a conflict; a refused field is shown with its name.
  async agents_and_workflow(context) {
    const page = await newPage(context);
    await start(page, 2);
    await go(page, 'Agents');
    await page.getByRole('button', { name: 'New agent' }).click();
    const offered = await page
      .getByRole('form', { name: 'agent form' })
      .getByLabel('Type')
      .locator('option')
      .allInnerTexts();
    await page.getByRole('button', { name: 'Cancel' }).click();
    expect(offered.length >= 5, `types offered: ${offered}`);

    // A refusal names its field: a DATA agent whose jq does not compile.
    await page.getByRole('button', { name: 'New agent' }).click();
    let form = page.getByRole('form', { name: 'agent form' });
    await form.getByLabel('Name').fill('broken');
    await form.getByLabel('Type').selectOption({ label: 'DATA' });
    await form.getByLabel('jq program').fill('.[');
    await form.getByRole('button', { name: 'Create' }).click();
    const refusal = form.getByRole('alert');
    await refusal.waitFor();
    const refusalText = await refusal.innerText();
    expect(/jq/i.test(refusalText) && (await refusal.locator('code.field').count()) > 0, `field refusal: ${refusalText}`);
    await shot(page, 'agent-refused');
    await form.getByRole('button', { name: 'Cancel' }).click();

    const created = [];
    for (const type of offered.filter((name) => name !== 'WORKFLOW')) {
      const name = `${type.toLowerCase()}-agent`;
      await createAgent(page, { name, type });
      created.push(name);
    }
    await shot(page, 'agents');
    const workflowId = await createWorkflow(page, 'two steps', [
      { key: 'shape', agent: 'data-agent (DATA)' },
      { key: 'run', agent: 'code-agent (CODE)', dependsOn: 'shape' },
    ]);
    const nodes = await page.locator('svg.dag g.node').evaluateAll((elements) =>
      elements.map((element) => ({ step: element.dataset.step, transform: element.getAttribute('transform') })),
    );
    expect(nodes.length === 2, `two nodes: ${JSON.stringify(nodes)}`);
    const x = (transform) => Number(/translate\(([-\d.]+)/.exec(transform)[1]);
    const byStep = Object.fromEntries(nodes.map((node) => [node.step, x(node.transform)]));
    expect(byStep.shape < byStep.run, `laid out left to right: ${JSON.stringify(nodes)}`);
    expect((await page.locator('svg.dag path.edge[data-from="shape"][data-to="run"]').count()) === 1, 'the edge is drawn');
    await shot(page, 'workflow-dag');

    if (offered.includes('WORKFLOW')) {
      await createAgent(page, {
        name: 'workflow-agent',
        type: 'WORKFLOW',
        fill: (agentForm) => agentForm.getByLabel('Workflow id').fill(workflowId),
      });
      created.push('workflow-agent');
    }
    expect(created.length === offered.length, `created ${created} of ${offered}`);

    // Two tabs edit the same workflow: the second save is a conflict, shown as such.
    await page.goto(`${baseUrl}/workflows/${workflowId}/edit`);
    await page.getByRole('form', { name: 'workflow form' }).waitFor();
    const other = await newPage(context);
    await other.goto(`${baseUrl}/workflows/${workflowId}/edit`);
    const otherForm = other.getByRole('form', { name: 'workflow form' });
    await otherForm.getByLabel('Description').fill('changed in another tab');
    await otherForm.getByRole('button', { name: 'Save' }).click();
    await other.getByText('changed in another tab').waitFor();
    await other.close();
    form = page.getByRole('form', { name: 'workflow form' });
    await form.getByLabel('Description').fill('changed here');
    await form.getByRole('button', { name: 'Save' }).click();
    const conflict = form.getByRole('alert');
    await conflict.waitFor();
    const conflictText = await conflict.innerText();
    expect(conflictText.startsWith('Conflict') && conflictText.includes('CONFLICT'), `conflict: ${conflictText}`);
    await shot(page, 'conflict');
  },

  // 3. Execute and watch it finish live: the steps change state in order, the logs appear
  //    without a reload, the output is shown.
  async live_execution(context) {
    const page = await newPage(context);
    await start(page, 3);
    await jqAgent(page, 'double', '{value: (.value * 2)}');
    await pythonAgent(
      page,
      'announce',
      [
        'import json, sys, time',
        'data = json.load(sys.stdin)',
        "print('announcing the value', data['value'], flush=True)",
        'time.sleep(2)',
        "print('still announcing', flush=True)",
        'time.sleep(1)',
        "print(json.dumps({'announced': data['value']}))",
      ].join('\n'),
    );
    await createWorkflow(page, 'live', [
      { key: 'double', agent: 'double (DATA)' },
      { key: 'announce', agent: 'announce (CODE)', dependsOn: 'double', inputMapping: { value: '{{steps.double.output.value}}' } },
    ]);
    // Records every status each node of the DAG shows, in order, across client-side navigation.
    await page.evaluate(() => {
      window.__seen = [];
      window.__sameDocument = true;
      const record = () => {
        for (const node of document.querySelectorAll('svg.dag g.node')) {
          const last = window.__seen.filter((entry) => entry.step === node.dataset.step).pop();
          if (!last || last.status !== node.dataset.status) {
            window.__seen.push({ step: node.dataset.step, status: node.dataset.status });
          }
        }
      };
      new MutationObserver(record).observe(document.body, { subtree: true, childList: true, attributes: true, attributeFilter: ['data-status'] });
    });
    await execute(page, { value: 21 });
    await page.locator('svg.dag g.node[data-step="announce"][data-status="RUNNING"]').waitFor({ timeout: 90_000 });
    await page.locator('.logs li', { hasText: 'announcing the value 42' }).waitFor();
    await shot(page, 'execution-running');
    await waitForStatus(page, 'SUCCEEDED');
    await page.locator('.logs li', { hasText: 'still announcing' }).waitFor();
    const output = await page.getByTestId('execution-output').innerText();
    expect(JSON.parse(output).announced === 42, `output shown: ${output}`);
    const seen = await page.evaluate(() => window.__seen);
    const sameDocument = await page.evaluate(() => window.__sameDocument === true);
    expect(sameDocument, 'no reload on the way');
    const index = (step, status) => seen.findIndex((entry) => entry.step === step && entry.status === status);
    expect(index('double', 'SUCCEEDED') >= 0 && index('announce', 'RUNNING') > index('double', 'SUCCEEDED'), `order: ${JSON.stringify(seen)}`);
    expect(index('announce', 'SUCCEEDED') > index('announce', 'RUNNING'), `order: ${JSON.stringify(seen)}`);
    await shot(page, 'execution-succeeded');
    expect(wire.methods.has('/turbocat.v1.ExecutionService/WatchExecution'), `watched over grpc-web: ${[...wire.methods]}`);
  },

  // 4. A failing step with a retry: the attempts are shown with their errors.
  async retried_failure(context) {
    const page = await newPage(context);
    await start(page, 4);
    await pythonAgent(page, 'always fails', "raise RuntimeError('the step broke on purpose')");
    await createWorkflow(page, 'failing', [{ key: 'fragile', agent: 'always fails (CODE)', maxAttempts: 2 }]);
    await execute(page, {});
    await waitForStatus(page, 'FAILED');
    const attempts = page.getByRole('table', { name: 'attempts of fragile' });
    await attempts.locator('tr[data-attempt="2"]', { hasText: 'the step broke on purpose' }).waitFor();
    const rows = await attempts.locator('tbody tr').allInnerTexts();
    expect(rows.length === 2, `two attempts: ${rows}`);
    expect(rows.every((row) => row.includes('FAILED') && row.includes('the step broke on purpose')), `errors shown: ${rows}`);
    expect((await page.locator('svg.dag g.node[data-step="fragile"]').getAttribute('data-status')) === 'FAILED', 'the node is red');
    await shot(page, 'attempts');
  },

  // 5. Cancel a long execution from the page.
  async cancel(context) {
    const page = await newPage(context);
    await start(page, 5);
    await pythonAgent(page, 'sleeper', "import time\nprint('going to sleep', flush=True)\ntime.sleep(300)");
    await createWorkflow(page, 'long', [{ key: 'sleep', agent: 'sleeper (CODE)' }]);
    await execute(page, {});
    await page.locator('svg.dag g.node[data-step="sleep"][data-status="RUNNING"]').waitFor({ timeout: 90_000 });
    await shot(page, 'running');
    await page.getByRole('button', { name: 'Cancel execution' }).click();
    await waitForStatus(page, 'CANCELLED');
    await page.locator('svg.dag g.node[data-step="sleep"][data-status="CANCELLED"]').waitFor();
    expect((await page.getByRole('button', { name: 'Cancel execution' }).count()) === 0, 'no cancel once cancelled');
    await shot(page, 'cancelled');
  },

  // 6. An API key: created, seen once, used with curl, revoked, refused.
  async api_key(context) {
    const page = await newPage(context);
    await start(page, 6);
    await go(page, 'API keys');
    const form = page.getByRole('form', { name: 'new API key' });
    await form.getByLabel('Name').fill('from curl');
    await form.getByLabel('READ').check();
    await form.getByRole('button', { name: 'Create key' }).click();
    const key = (await page.getByTestId('new-key').innerText()).trim();
    expect(key.length > 20, `a key: ${key}`);
    await shot(page, 'key-shown-once');
    const curl = () =>
      execFileSync('curl', ['-s', '-o', '/dev/null', '-w', '%{http_code}', '-H', `x-api-key: ${key}`, `${baseUrl}/api/v1/workflows`], {
        encoding: 'utf8',
      });
    expect(curl() === '200', 'the key works');
    await page.getByRole('button', { name: 'Done' }).click();
    await page.reload();
    await page.locator('tr[data-key="from curl"]').waitFor();
    expect(!(await page.content()).includes(key), 'the key is not shown again');
    const row = await page.locator('tr[data-key="from curl"]').innerText();
    expect(row.includes('READ'), `its scopes: ${row}`);
    await shot(page, 'key-listed');
    await page.locator('tr[data-key="from curl"]').getByRole('button', { name: 'Revoke' }).click();
    await page.locator('tr[data-key="from curl"]').waitFor({ state: 'detached' });
    await page.reload();
    await page.getByRole('table', { name: 'API keys' }).waitFor();
    await page.waitForLoadState('networkidle');
    expect((await page.locator('tr[data-key="from curl"]').count()) === 0, 'the revoked key is gone from the list');
    const status = curl();
    expect(status === '401', `the revoked key is refused: ${status}`);
    await shot(page, 'key-revoked');
  },

  // 7. The dashboard shows the executions the test ran.
  async dashboard(context) {
    const page = await newPage(context);
    await start(page, 7);
    await jqAgent(page, 'passes', '{ok: true}');
    await jqAgent(page, 'refuses', 'error("refused on purpose")');
    await createWorkflow(page, 'passing', [{ key: 'pass', agent: 'passes (DATA)' }]);
    const passed = await execute(page, {});
    await waitForStatus(page, 'SUCCEEDED');
    await createWorkflow(page, 'failing', [{ key: 'fail', agent: 'refuses (DATA)' }]);
    const failed = await execute(page, {});
    await waitForStatus(page, 'FAILED');
    await go(page, 'Dashboard');
    await page.locator(`tr[data-execution="${failed}"]`).waitFor();
    await page.locator(`tr[data-execution="${passed}"]`).waitFor();
    const tile = async (id) => (await page.getByTestId(id).innerText()).trim();
    expect((await tile('executions-total')) === '2', `total ${await tile('executions-total')}`);
    expect((await tile('executions-succeeded')) === '1', `succeeded ${await tile('executions-succeeded')}`);
    expect((await tile('executions-failed')) === '1', `failed ${await tile('executions-failed')}`);
    const ranking = await page.getByRole('heading', { name: 'Most failing workflows' }).locator('..').innerText();
    expect(ranking.includes('failing'), `most failing: ${ranking}`);
    await shot(page, 'dashboard');
    // The other pages render without a refusal or an error, at desktop and phone widths.
    // The first account of an installation is its administrator: it sees the users page too.
    const pages = ['Executions', 'Templates', 'Deployments', 'Runners', 'Workflows', 'Agents', 'API keys', 'Users'];
    for (const label of pages) {
      const heading = label;
      await go(page, label, heading);
      await page.waitForLoadState('networkidle');
      expect((await page.getByRole('alert').count()) === 0, `${label} shows no refusal`);
      await shot(page, label.toLowerCase());
    }
    // A built-in workflow template instantiated from its page lands on the new workflow's DAG.
    await go(page, 'Templates');
    await page.getByLabel('kind filter').selectOption({ label: 'WORKFLOW' });
    const template = page.getByRole('table', { name: 'templates' }).locator('tbody tr').first();
    await template.waitFor();
    await template.getByRole('button', { name: 'Instantiate' }).click();
    await page.waitForURL(/\/workflows\/[0-9a-f-]+$/);
    await page.locator('svg.dag g.node').first().waitFor();
    await shot(page, 'instantiated-template');
    // A template of one's own: created (the example body), renamed, instantiated into an agent.
    await go(page, 'Templates');
    await page.getByRole('button', { name: 'New template' }).click();
    const templateForm = page.getByRole('form', { name: 'new template' });
    await templateForm.getByLabel('Name', { exact: true }).fill('my echo');
    await templateForm.getByRole('button', { name: 'Create' }).click();
    await page.getByLabel('kind filter').selectOption({ label: 'All kinds' });
    const mine = page.locator('tr[data-template="my echo"]');
    await mine.getByRole('button', { name: 'Edit' }).click();
    const editForm = page.getByRole('form', { name: 'Edit my echo' });
    await editForm.getByLabel('Name', { exact: true }).fill('my jq echo');
    const editedBody = '{"type": "DATA", "config": {"data": {"jqProgram": "{{params.program}} | {edited: true}"}}}';
    await editForm.getByLabel(/^Body/).fill(editedBody);
    await editForm.getByRole('button', { name: 'Save' }).click();
    // The body was saved: the form opened again shows it as the server keeps it.
    await page.locator('tr[data-template="my jq echo"]').getByRole('button', { name: 'Edit' }).click();
    const reopened = page.getByRole('form', { name: 'Edit my jq echo' });
    const savedBody = await reopened.getByLabel(/^Body/).inputValue();
    if (!savedBody.includes('{edited: true}')) throw new Error(`the template's body was not saved: ${savedBody}`);
    await reopened.getByRole('button', { name: 'Cancel' }).click();
    await page.locator('tr[data-template="my jq echo"]').getByRole('button', { name: 'Instantiate' }).click();
    await page.getByRole('heading', { name: 'Agents' }).waitFor();
    await page.locator('tr[data-agent="my jq echo"]').waitFor();
    await shot(page, 'template-instantiated');
    // A manual deployment of a workflow: created and started from its page.
    await go(page, 'Deployments');
    const deploymentForm = page.getByRole('form', { name: 'new deployment' });
    await deploymentForm.getByLabel('Name').fill('by hand');
    await deploymentForm.getByLabel('Workflow').selectOption({ label: 'passing' });
    await deploymentForm.getByRole('button', { name: 'Create deployment' }).click();
    const deployment = page.getByRole('table', { name: 'deployments' }).locator('tr', { hasText: 'by hand' });
    await deployment.waitFor();
    await deployment.getByRole('button', { name: 'Start' }).click();
    await page.getByRole('table', { name: 'deployments' }).locator('tr', { hasText: 'RUNNING' }).waitFor();
    expect((await page.getByRole('alert').count()) === 0, 'the deployment started');
    await shot(page, 'deployment-started');
    await page.setViewportSize({ width: 390, height: 844 });
    await go(page, 'Dashboard');
    await page.getByTestId('executions-total').waitFor();
    await shot(page, 'dashboard-phone');
  },
  // 8. At phone size (390 x 844) every main page reflows: no sideways scrolling of the page.
  async phone(context) {
    const page = await newPage(context);
    await page.setViewportSize({ width: 390, height: 844 });
    await page.goto(`${baseUrl}/signin`);
    await page.getByRole('heading', { name: 'Sign in' }).waitFor();
    await fitsThePhone(page, 'sign-in');
    await register(page, `journey8-${Date.now()}@example.com`);
    await page.getByTestId('executions-total').waitFor();
    await fitsThePhone(page, 'dashboard');
    await jqAgent(page, 'double', '{value: (.value * 2)}');
    await fitsThePhone(page, 'agents');
    await createWorkflow(page, 'a workflow with a rather long name to see it wrap on a phone', [
      { key: 'first-step-with-a-long-key', agent: 'double (DATA)' },
      { key: 'second', agent: 'double (DATA)', dependsOn: 'first-step-with-a-long-key', inputMapping: { value: '{{steps.first-step-with-a-long-key.output.value}}' } },
      { key: 'third', agent: 'double (DATA)', dependsOn: 'second', inputMapping: { value: '{{steps.second.output.value}}' } },
    ]);
    const dag = await page.locator('svg.dag').boundingBox();
    expect(dag && dag.width <= 390, `the DAG scales to the phone: ${JSON.stringify(dag)}`);
    await fitsThePhone(page, 'workflow-dag');
    await execute(page, { value: 1 });
    await waitForStatus(page, 'SUCCEEDED');
    await fitsThePhone(page, 'execution');
    await go(page, 'Workflows');
    await page.locator('table[aria-label="workflows"] tbody tr').first().waitFor();
    await fitsThePhone(page, 'workflows');
    await go(page, 'Executions');
    await fitsThePhone(page, 'executions');
    await go(page, 'Runners');
    await fitsThePhone(page, 'runners');
    await go(page, 'API keys');
    const form = page.getByRole('form', { name: 'new API key' });
    await form.getByLabel('Name').fill('phone');
    await form.getByLabel('READ').check();
    await form.getByRole('button', { name: 'Create key' }).click();
    await page.getByTestId('new-key').waitFor();
    await fitsThePhone(page, 'api-key-shown');
    await page.getByRole('button', { name: 'Done' }).click();
    await page.locator('tr[data-key="phone"]').waitFor();
    await fitsThePhone(page, 'api-keys');
  },

  // 9. Only the keyboard: sign in, go to the workflows, open one and execute it. Every stop of
  //    the focus is a real control with a visible focus ring; no element but a control listens
  //    for clicks or keys. The test made the account and its workflow "by keyboard".
  async keyboard(context) {
    await context.addInitScript(recordListeners);
    const page = await newPage(context);
    await page.goto(`${baseUrl}/signin`);
    await page.getByRole('heading', { name: 'Sign in' }).waitFor();
    const rules = await page.evaluate(() =>
      [...document.styleSheets].flatMap((sheet) => [...sheet.cssRules]).filter((rule) => rule.selectorText?.includes(':focus-visible')).length,
    );
    expect(rules > 0, 'the stylesheet styles :focus-visible');
    await noClickableDivs(page);
    await tabTo(page, 'input', 'Email');
    await page.keyboard.type(process.env.TURBOCAT_CONSOLE_EMAIL ?? '');
    await tabTo(page, 'input', 'Password');
    await page.keyboard.type(process.env.TURBOCAT_CONSOLE_PASSWORD ?? '');
    await shot(page, 'sign-in-focused');
    await page.keyboard.press('Enter');
    await page.getByRole('heading', { name: 'Dashboard' }).waitFor();
    await page.waitForLoadState('networkidle');
    await noClickableDivs(page);
    await tabTo(page, 'a', 'Workflows');
    await shot(page, 'nav-focused');
    await page.keyboard.press('Enter');
    await page.getByRole('heading', { name: 'Workflows', exact: true }).waitFor();
    await page.locator('table[aria-label="workflows"] tbody tr').first().waitFor();
    await noClickableDivs(page);
    await tabTo(page, 'a', 'by keyboard');
    await page.keyboard.press('Enter');
    await page.getByRole('heading', { name: 'by keyboard', exact: true }).waitFor();
    await page.locator('svg.dag g.node').first().waitFor();
    await noClickableDivs(page);
    await tabTo(page, 'textarea', 'Input (JSON)');
    await page.keyboard.press('ControlOrMeta+a');
    await page.keyboard.type('{"value": 4}');
    // Past the button and back again: Shift+Tab works as well.
    await tabTo(page, 'button', 'Execute');
    await tabTo(page, 'textarea', 'Input (JSON)', { back: true });
    await tabTo(page, 'button', 'Execute');
    await shot(page, 'execute-focused');
    await page.keyboard.press('Space');
    await page.waitForURL(/\/executions\/[0-9a-f-]+$/);
    await waitForStatus(page, 'SUCCEEDED');
    const output = await page.getByTestId('execution-output').innerText();
    expect(JSON.parse(output).value === 8, `executed with the typed input: ${output}`);
    await noClickableDivs(page);
    await tabTo(page, 'a', 'Workflows', { back: true, limit: 80 });
    await shot(page, 'execution');
  },
};

try {
  const run = journeys[journey];
  if (!run) fail(`no journey ${journey}`);
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  await run(context);
  expect(wire.grpcWeb > 0, 'the page made grpc-web calls');
  if (problems.length) fail(problems.join('\n'));
  process.stdout.write(`${JSON.stringify({ ok: true, grpcWebCalls: wire.grpcWeb, methods: [...wire.methods].sort(), screenshots: shots })}\n`);
} catch (error) {
  // What the page showed when the journey failed.
  for (const context of browser.contexts()) {
    for (const [index, page] of context.pages().entries()) {
      await page.screenshot({ path: join(screenshotFolder, `${prefix}-failure-${index}.png`), fullPage: true }).catch(() => {});
    }
  }
  process.stderr.write(`journey ${journey} failed: ${error.stack ?? error}\n${problems.join('\n')}\n`);
  process.exitCode = 1;
} finally {
  await browser.close();
}
