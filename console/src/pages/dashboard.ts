// The dashboard (AnalyticsService.GetOverview): executions over time by status, success rate,
// duration percentiles, busiest and most failing workflows, and the latest executions.
import { timestampDate, timestampFromDate } from '@bufbuild/protobuf/wkt';
import { client } from '../api';
import { AnalyticsService, type OutcomeBucket } from '../gen/turbocat/v1/analytics_pb';
import { ExecutionService } from '../gen/turbocat/v1/execution_pb';
import { html, Link, RefusalBox, seconds, useLoad } from '../ui';
import { ExecutionTable } from './execution';

const DAY = 24 * 3600 * 1000;

export function DashboardPage() {
  const overview = useLoad(() => {
    const to = new Date(Date.now() + 60_000);
    const from = new Date(to.getTime() - 7 * DAY);
    return client(AnalyticsService).getOverview({
      from: timestampFromDate(from),
      to: timestampFromDate(to),
      bucket: 'day',
    });
  }, []);
  const recent = useLoad(() => client(ExecutionService).listExecutions({ pageSize: 10 }), []);
  const data = overview.data;
  return html`<h1>Dashboard</h1>
    <${RefusalBox} refusal=${overview.refusal ?? recent.refusal} />
    ${data
      ? html`<section class="tiles" aria-label="overview">
            <div class="tile"><span>Executions (7 days)</span><strong data-testid="executions-total">${data.executions?.total ?? 0}</strong></div>
            <div class="tile"><span>Succeeded</span><strong data-testid="executions-succeeded">${data.executions?.succeeded ?? 0}</strong></div>
            <div class="tile"><span>Failed</span><strong data-testid="executions-failed">${data.executions?.failed ?? 0}</strong></div>
            <div class="tile"><span>Cancelled</span><strong>${data.executions?.cancelled ?? 0}</strong></div>
            <div class="tile"><span>Success rate</span><strong>${(data.successRate * 100).toFixed(0)} %</strong></div>
            <div class="tile"><span>Running / queued</span><strong>${data.runningExecutions} / ${data.queuedExecutions}</strong></div>
            <div class="tile"><span>Duration p50 / p95 / p99</span>
              <strong>${seconds(data.duration?.p50Seconds ?? NaN)} / ${seconds(data.duration?.p95Seconds ?? NaN)} / ${seconds(data.duration?.p99Seconds ?? NaN)}</strong></div>
            <div class="tile"><span>Agents · workflows · runners</span><strong>${data.agentCount} · ${data.workflowCount} · ${data.runnerCount}</strong></div>
          </section>
          <h2>Executions over time</h2>
          <${Buckets} buckets=${data.buckets} />
          <div class="columns">
            <div><h2>Busiest workflows</h2><${Ranking} rows=${data.busiestWorkflows} /></div>
            <div><h2>Most failing workflows</h2><${Ranking} rows=${data.mostFailingWorkflows} /></div>
          </div>`
      : html`<p>Loading…</p>`}
    <h2>Latest executions</h2>
    <${ExecutionTable} executions=${recent.data?.executions ?? []} />`;
}

function Buckets(props: { buckets: OutcomeBucket[] }) {
  const highest = Math.max(1, ...props.buckets.map((bucket) => bucket.executions?.total ?? 0));
  return html`<div class="buckets" role="img" aria-label="executions per day by status">
    ${props.buckets.map((bucket) => {
      const counts = bucket.executions;
      const day = bucket.start ? timestampDate(bucket.start).toISOString().slice(5, 10) : '';
      const part = (count: number, status: string) =>
        count ? html`<span class="bar status-${status}" style=${{ height: `${(count / highest) * 100}%` }} title=${`${count} ${status}`}></span>` : null;
      return html`<div class="bucket" title=${`${day}: ${counts?.total ?? 0}`}>
        <div class="stack-bar">
          ${part(counts?.succeeded ?? 0, 'SUCCEEDED')}${part(counts?.failed ?? 0, 'FAILED')}
          ${part(counts?.cancelled ?? 0, 'CANCELLED')}${part(counts?.timedOut ?? 0, 'TIMED_OUT')}
        </div>
        <span class="day">${day}</span>
      </div>`;
    })}
  </div>`;
}

function Ranking(props: { rows: { workflowId: string; workflowName: string; executions: number; failed: number }[] }) {
  if (!props.rows.length) return html`<p class="muted">None yet.</p>`;
  return html`<table class="list"><thead><tr><th>Workflow</th><th>Executions</th><th>Failed</th></tr></thead><tbody>
    ${props.rows.map(
      (row) => html`<tr><td><${Link} href=${`/workflows/${row.workflowId}`}>${row.workflowName}</${Link}></td><td>${row.executions}</td><td>${row.failed}</td></tr>`,
    )}
  </tbody></table>`;
}
