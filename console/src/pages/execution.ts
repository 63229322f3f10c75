// Executions: the list, and the live page (WatchExecution over grpc-web): the DAG with each
// step's colour following its status, attempts with their errors, inputs and outputs, logs as
// they arrive, and cancel.
import { useEffect, useState } from 'preact/hooks';
import { client, showValue } from '../api';
import {
  ExecutionService,
  ExecutionStatus,
  LogLevel,
  StepRunStatus,
  type Execution,
  type ExecutionLog,
  type StepAttempt,
  type StepRun,
} from '../gen/turbocat/v1/execution_pb';
import { WorkflowService, type Workflow } from '../gen/turbocat/v1/workflow_pb';
import { asRefusal, type Refusal } from '../api';
import { Dag } from '../dag';
import { html, Link, Pager, RefusalBox, useAction, useLoad, when } from '../ui';

const FINAL = new Set([
  ExecutionStatus.SUCCEEDED,
  ExecutionStatus.FAILED,
  ExecutionStatus.CANCELLED,
  ExecutionStatus.TIMED_OUT,
]);

export function ExecutionsPage() {
  const [status, setStatus] = useState(ExecutionStatus.UNSPECIFIED);
  const [page, setPage] = useState(1);
  const list = useLoad(
    () => client(ExecutionService).listExecutions({ page, pageSize: 20, status }),
    [page, status],
  );
  const statuses = [
    ExecutionStatus.QUEUED,
    ExecutionStatus.RUNNING,
    ExecutionStatus.SUCCEEDED,
    ExecutionStatus.FAILED,
    ExecutionStatus.CANCELLED,
    ExecutionStatus.TIMED_OUT,
  ];
  return html`<h1>Executions</h1>
    <div class="toolbar">
      <select aria-label="status filter" value=${status}
        onChange=${(event: Event) => (setStatus(Number((event.target as HTMLSelectElement).value)), setPage(1))}>
        <option value=${ExecutionStatus.UNSPECIFIED}>All statuses</option>
        ${statuses.map((value) => html`<option value=${value}>${ExecutionStatus[value]}</option>`)}
      </select>
    </div>
    <${RefusalBox} refusal=${list.refusal} />
    <${ExecutionTable} executions=${list.data?.executions ?? []} />
    <${Pager} page=${page} totalPages=${list.data?.pagination?.totalPages ?? 1} onPage=${setPage} />`;
}

/** The distinctive end of an id (ids of one moment share their first characters). */
export function shortId(id: string): string {
  return id.slice(-12);
}

export function ExecutionTable(props: { executions: Execution[] }) {
  return html`<table class="list" aria-label="executions">
    <thead><tr><th>Execution</th><th>Status</th><th>Created</th><th>Finished</th></tr></thead>
    <tbody>
      ${props.executions.map(
        (execution) => html`<tr data-execution=${execution.id}>
          <td><${Link} href=${`/executions/${execution.id}`}>${shortId(execution.id)}</${Link}></td>
          <td class="status-${ExecutionStatus[execution.status]}">${ExecutionStatus[execution.status]}</td>
          <td>${when(execution.createdAt)}</td><td>${when(execution.finishedAt)}</td>
        </tr>`,
      )}
    </tbody>
  </table>`;
}

interface Live {
  execution?: Execution;
  steps: Map<string, StepRun>;
  /** Every attempt of each step (GetExecution fills them; the stream's events do not). */
  attempts: Map<string, StepAttempt[]>;
  logs: ExecutionLog[];
}

const STEP_FINAL = new Set([
  StepRunStatus.SUCCEEDED,
  StepRunStatus.FAILED,
  StepRunStatus.CANCELLED,
  StepRunStatus.TIMED_OUT,
  StepRunStatus.LEASE_LOST,
]);

function useWatch(executionId: string): [Live, Refusal | null] {
  const [live, setLive] = useState<Live>({ steps: new Map(), attempts: new Map(), logs: [] });
  const [refusal, setRefusal] = useState<Refusal | null>(null);
  useEffect(() => {
    const abort = new AbortController();
    const state: Live = { steps: new Map(), attempts: new Map(), logs: [] };
    const seenLogs = new Set<bigint>();
    const publish = () => setLive({ ...state });
    // A step that finished an attempt: read every attempt again (shortly, once for a burst).
    let attemptsTimer: ReturnType<typeof setTimeout> | undefined;
    const readAttempts = () => {
      if (attemptsTimer) clearTimeout(attemptsTimer);
      attemptsTimer = setTimeout(async () => {
        try {
          const answer = await client(ExecutionService).getExecution({ executionId }, { signal: abort.signal });
          state.attempts = new Map(
            (answer.execution?.stepRuns ?? []).map((stepRun) => [stepRun.stepKey, stepRun.attempts]),
          );
          publish();
        } catch (error) {
          if (!abort.signal.aborted) setRefusal(asRefusal(error));
        }
      }, 200);
    };
    const takeStep = (stepRun: StepRun) => {
      const previous = state.steps.get(stepRun.stepKey);
      state.steps = new Map(state.steps);
      state.steps.set(stepRun.stepKey, stepRun);
      if (STEP_FINAL.has(stepRun.status) || (previous && previous.attempt !== stepRun.attempt)) readAttempts();
    };
    const addLog = (log: ExecutionLog) => {
      if (seenLogs.has(log.id)) return;
      seenLogs.add(log.id);
      state.logs = [...state.logs, log].sort((a, b) => (a.id < b.id ? -1 : 1));
    };
    const takeExecution = (execution: Execution) => {
      state.execution = execution;
      for (const stepRun of execution.stepRuns) takeStep(stepRun);
    };
    (async () => {
      // The stream starts at a snapshot; the lines logged before it come from the log list.
      while (!abort.signal.aborted) {
        try {
          const earlier = await client(ExecutionService).listExecutionLogs(
            { executionId, pageSize: 500 },
            { signal: abort.signal },
          );
          for (const log of earlier.logs) addLog(log);
          publish();
          for await (const event of client(ExecutionService).watchExecution(
            { executionId },
            { signal: abort.signal },
          )) {
            const kind = event.event;
            if (kind.case === 'snapshot' || kind.case === 'executionChanged') takeExecution(kind.value);
            else if (kind.case === 'stepChanged' && kind.value.stepRun) takeStep(kind.value.stepRun);
            else if (kind.case === 'log') addLog(kind.value);
            publish();
          }
          setRefusal(null);
        } catch (error) {
          if (abort.signal.aborted) return;
          setRefusal(asRefusal(error));
        }
        // The server ends the stream once the execution finished; a stream that ended earlier
        // (a restart, the session's end) is opened again.
        if (state.execution && FINAL.has(state.execution.status)) return;
        await new Promise((resolve) => setTimeout(resolve, 1000));
      }
    })();
    return () => {
      abort.abort();
      if (attemptsTimer) clearTimeout(attemptsTimer);
    };
  }, [executionId]);
  return [live, refusal];
}

export function ExecutionPage(props: { executionId: string }) {
  const [live, watchRefusal] = useWatch(props.executionId);
  const [workflow, setWorkflow] = useState<Workflow | undefined>(undefined);
  const [refusal, busy, run] = useAction();
  const execution = live.execution;
  const workflowId = execution?.workflowId;
  useEffect(() => {
    if (!workflowId) return;
    client(WorkflowService)
      .getWorkflow({ workflowId })
      .then((answer) => setWorkflow(answer.workflow), () => setWorkflow(undefined));
  }, [workflowId]);
  if (!execution) {
    return html`<h1>Execution</h1><${RefusalBox} refusal=${watchRefusal} /><p>Connecting…</p>`;
  }
  const status = ExecutionStatus[execution.status];
  const stepKeys = workflow
    ? workflow.steps.map((step) => step.key)
    : [...live.steps.keys()];
  const dagSteps = stepKeys.map((key) => {
    const stepRun = live.steps.get(key);
    const stepStatus = stepRun ? StepRunStatus[stepRun.status] : '';
    return {
      key,
      dependsOn: workflow?.steps.find((step) => step.key === key)?.dependsOn ?? [],
      status: stepStatus,
      label: stepRun ? `${stepStatus} · ${stepRun.attempt}/${stepRun.maxAttempts || 1}` : 'waiting',
    };
  });
  const cancel = () => run(() => client(ExecutionService).cancelExecution({ executionId: execution.id, reason: 'cancelled from the console' }));
  return html`<h1>Execution <code>${shortId(execution.id)}</code></h1>
    <p>
      <span class="badge status-${status}" data-testid="execution-status">${status}</span>
      ${workflow ? html` of <${Link} href=${`/workflows/${workflow.id}`}>${workflow.name}</${Link}>` : null}
      <span class="muted"> · started ${when(execution.startedAt)} · finished ${when(execution.finishedAt)}</span>
    </p>
    ${FINAL.has(execution.status) ? null : html`<button class="danger" disabled=${busy} onClick=${cancel}>Cancel execution</button>`}
    <${RefusalBox} refusal=${refusal ?? watchRefusal} />
    <section class="card"><${Dag} steps=${dagSteps} /></section>
    ${execution.error ? html`<p class="error-text" data-testid="execution-error">${execution.error}</p>` : null}
    <h2>Output</h2>
    <pre class="json" data-testid="execution-output">${showValue(execution.output)}</pre>
    <h2>Steps</h2>
    ${stepKeys.map((key) => html`<${StepPanel} key=${key} stepKey=${key} stepRun=${live.steps.get(key)} attempts=${live.attempts.get(key) ?? []} />`)}
    <h2>Logs</h2>
    <ol class="logs" aria-label="logs" aria-live="polite">
      ${live.logs.map(
        (log) => html`<li class="log level-${LogLevel[log.level]}">
          <span class="muted">${when(log.createdAt)} ${log.stepKey}#${log.attempt}</span> ${log.message}
        </li>`,
      )}
    </ol>`;
}

function StepPanel(props: { stepKey: string; stepRun?: StepRun; attempts: StepAttempt[] }) {
  const stepRun = props.stepRun;
  if (!stepRun) return html`<details class="step"><summary>${props.stepKey}: waiting</summary></details>`;
  const status = StepRunStatus[stepRun.status];
  return html`<details class="step" open data-step=${props.stepKey} data-status=${status}>
    <summary><strong>${props.stepKey}</strong>: <span class="status-${status}">${status}</span>,
      attempt ${stepRun.attempt} of ${stepRun.maxAttempts || 1}</summary>
    <div class="columns">
      <div><h3>Input</h3><pre class="json">${showValue(stepRun.input)}</pre></div>
      <div><h3>Output</h3><pre class="json">${showValue(stepRun.output)}</pre></div>
    </div>
    ${stepRun.error ? html`<p class="error-text">${stepRun.error}</p>` : null}
    ${props.attempts.length
      ? html`<table class="list attempts" aria-label=${`attempts of ${props.stepKey}`}>
          <thead><tr><th>Attempt</th><th>Status</th><th>Started</th><th>Finished</th><th>Error</th></tr></thead>
          <tbody>
            ${props.attempts.map(
              (attempt) => html`<tr data-attempt=${attempt.attempt}>
                <td>${attempt.attempt}</td><td class="status-${StepRunStatus[attempt.status]}">${StepRunStatus[attempt.status]}</td>
                <td>${when(attempt.startedAt)}</td><td>${when(attempt.finishedAt)}</td>
                <td class="error-text">${attempt.error}</td>
              </tr>`,
            )}
          </tbody>
        </table>`
      : null}
  </details>`;
}
