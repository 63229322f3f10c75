// Workflows: list with search and pages; create and edit (steps, dependencies, input mappings,
// retries; a stale version is shown as a conflict); delete; the workflow page draws the DAG and
// executes it with an input.
import { create } from '@bufbuild/protobuf';
import { useState } from 'preact/hooks';
import { client, jsonToValue, parseJson, showValue } from '../api';
import { AgentService, AgentType } from '../gen/turbocat/v1/agent_pb';
import { ExecutionStatus } from '../gen/turbocat/v1/execution_pb';
import {
  WorkflowSchema,
  WorkflowService,
  WorkflowStepSchema,
  type Workflow,
} from '../gen/turbocat/v1/workflow_pb';
import { Dag } from '../dag';
import { shortId } from './execution';
import { html, Link, navigate, Pager, RefusalBox, useAction, useLoad, when } from '../ui';

export function WorkflowsPage() {
  const [search, setSearch] = useState('');
  const [page, setPage] = useState(1);
  const list = useLoad(
    () => client(WorkflowService).listWorkflows({ page, pageSize: 20, search }),
    [page, search],
  );
  return html`<h1>Workflows</h1>
    <div class="toolbar">
      <input type="search" aria-label="search workflows" placeholder="Search" value=${search}
        onInput=${(event: Event) => (setSearch((event.target as HTMLInputElement).value), setPage(1))} />
      <${Link} href="/workflows/new" class="button">New workflow</${Link}>
    </div>
    <${RefusalBox} refusal=${list.refusal} />
    <table class="list" aria-label="workflows">
      <thead><tr><th>Name</th><th>Description</th><th>Version</th><th>Updated</th></tr></thead>
      <tbody>
        ${(list.data?.workflows ?? []).map(
          (workflow) => html`<tr>
            <td><${Link} href=${`/workflows/${workflow.id}`}>${workflow.name}</${Link}></td>
            <td>${workflow.description}</td><td>${workflow.version}</td><td>${when(workflow.updatedAt)}</td>
          </tr>`,
        )}
      </tbody>
    </table>
    <${Pager} page=${page} totalPages=${list.data?.pagination?.totalPages ?? 1} onPage=${setPage} />`;
}

interface StepDraft {
  key: string;
  agentId: string;
  dependsOn: string;
  inputMapping: string;
  maxAttempts: string;
}

function stepDrafts(workflow: Workflow | undefined): StepDraft[] {
  if (!workflow) return [{ key: 'first', agentId: '', dependsOn: '', inputMapping: '', maxAttempts: '' }];
  return workflow.steps.map((step) => ({
    key: step.key,
    agentId: step.agentId,
    dependsOn: step.dependsOn.join(', '),
    inputMapping: showValue(step.inputMapping),
    maxAttempts: step.retryPolicy?.maxAttempts ? String(step.retryPolicy.maxAttempts) : '',
  }));
}

export function WorkflowEditPage(props: { workflowId?: string }) {
  const loaded = useLoad(
    async () => {
      const agents = await client(AgentService).listAgents({ pageSize: 100 });
      const workflow = props.workflowId
        ? (await client(WorkflowService).getWorkflow({ workflowId: props.workflowId })).workflow
        : undefined;
      return { agents: agents.agents, workflow };
    },
    [props.workflowId],
  );
  if (loaded.refusal) return html`<${RefusalBox} refusal=${loaded.refusal} />`;
  if (!loaded.data) return html`<p>Loading…</p>`;
  return html`<${WorkflowForm} agents=${loaded.data.agents} workflow=${loaded.data.workflow} />`;
}

function WorkflowForm(props: { agents: { id: string; name: string; type: AgentType }[]; workflow?: Workflow }) {
  const existing = props.workflow;
  const [name, setName] = useState(existing?.name ?? '');
  const [description, setDescription] = useState(existing?.description ?? '');
  const [defaultInput, setDefaultInput] = useState(showValue(existing?.defaultInput));
  const [steps, setSteps] = useState<StepDraft[]>(stepDrafts(existing));
  const [refusal, busy, run] = useAction();
  const setStep = (index: number, field: keyof StepDraft) => (event: Event) => {
    const value = (event.target as HTMLInputElement).value;
    setSteps(steps.map((step, at) => (at === index ? { ...step, [field]: value } : step)));
  };
  const submit = async (event: Event) => {
    event.preventDefault();
    const saved = await run(async () => {
      const workflow = create(WorkflowSchema, {
        id: existing?.id ?? '',
        version: existing?.version ?? 0,
        name,
        description,
        defaultInput: defaultInput.trim() ? jsonToValue(parseJson(defaultInput, 'defaultInput')) : undefined,
        steps: steps.map((step, index) =>
          create(WorkflowStepSchema, {
            key: step.key,
            agentId: step.agentId,
            dependsOn: step.dependsOn.split(',').map((key) => key.trim()).filter(Boolean),
            inputMapping: step.inputMapping.trim()
              ? jsonToValue(parseJson(step.inputMapping, `steps[${index}].inputMapping`))
              : undefined,
            retryPolicy: step.maxAttempts ? { maxAttempts: Number(step.maxAttempts) } : undefined,
          }),
        ),
      });
      if (existing) {
        return (
          await client(WorkflowService).updateWorkflow({
            workflow,
            updateMask: { paths: ['name', 'description', 'steps', 'default_input'] },
          })
        ).workflow;
      }
      return (await client(WorkflowService).createWorkflow({ workflow })).workflow;
    });
    if (saved) navigate(`/workflows/${saved.id}`);
  };
  return html`<h1>${existing ? `Edit ${existing.name}` : 'New workflow'}</h1>
    <form class="stack" onSubmit=${submit} aria-label="workflow form">
      <label>Name <input name="name" required value=${name} onInput=${(event: Event) => setName((event.target as HTMLInputElement).value)} /></label>
      <label>Description <input name="description" value=${description} onInput=${(event: Event) => setDescription((event.target as HTMLInputElement).value)} /></label>
      <label>Default input (JSON) <textarea name="defaultInput" rows="3" value=${defaultInput}
        onInput=${(event: Event) => setDefaultInput((event.target as HTMLTextAreaElement).value)}></textarea></label>
      <fieldset>
        <legend>Steps</legend>
        ${steps.map(
          (step, index) => html`<div class="step-row" data-step-index=${index}>
            <label>Key <input name="key" required value=${step.key} onInput=${setStep(index, 'key')} /></label>
            <label>Agent
              <select name="agent" value=${step.agentId} onChange=${setStep(index, 'agentId')}>
                <option value="">choose…</option>
                ${props.agents.map((agent) => html`<option value=${agent.id}>${agent.name} (${AgentType[agent.type]})</option>`)}
              </select></label>
            <label>Depends on <input name="dependsOn" placeholder="keys, comma-separated" value=${step.dependsOn} onInput=${setStep(index, 'dependsOn')} /></label>
            <label>Max attempts <input name="maxAttempts" inputmode="numeric" value=${step.maxAttempts} onInput=${setStep(index, 'maxAttempts')} /></label>
            <label class="wide">Input mapping (JSON) <textarea name="inputMapping" rows="2" value=${step.inputMapping} onInput=${setStep(index, 'inputMapping')}></textarea></label>
            <button type="button" class="danger" onClick=${() => setSteps(steps.filter((_, at) => at !== index))}>Remove step</button>
          </div>`,
        )}
        <button type="button" onClick=${() => setSteps([...steps, { key: `step${steps.length + 1}`, agentId: '', dependsOn: '', inputMapping: '', maxAttempts: '' }])}>Add step</button>
      </fieldset>
      <${RefusalBox} refusal=${refusal} />
      <div class="row">
        <button type="submit" disabled=${busy}>${existing ? 'Save' : 'Create'}</button>
        <${Link} href=${existing ? `/workflows/${existing.id}` : '/workflows'}>Cancel</${Link}>
      </div>
    </form>`;
}

export function WorkflowPage(props: { workflowId: string }) {
  const loaded = useLoad(
    () => client(WorkflowService).getWorkflow({ workflowId: props.workflowId }),
    [props.workflowId],
  );
  const executions = useLoad(
    () => client(WorkflowService).listWorkflowExecutions({ workflowId: props.workflowId, pageSize: 10 }),
    [props.workflowId],
  );
  const [input, setInput] = useState<string | null>(null);
  const [refusal, busy, run] = useAction();
  const workflow = loaded.data?.workflow;
  if (loaded.refusal) return html`<${RefusalBox} refusal=${loaded.refusal} />`;
  if (!workflow) return html`<p>Loading…</p>`;
  const inputText = input ?? (showValue(workflow.defaultInput) || '{}');
  const execute = async (event: Event) => {
    event.preventDefault();
    const answer = await run(() =>
      client(WorkflowService).executeWorkflow({
        workflowId: workflow.id,
        input: jsonToValue(parseJson(inputText, 'input')),
      }),
    );
    if (answer?.execution) navigate(`/executions/${answer.execution.id}`);
  };
  const remove = async () => {
    if (!confirm(`Delete workflow ${workflow.name}?`)) return;
    const done = await run(() =>
      client(WorkflowService).deleteWorkflow({ workflowId: workflow.id, version: workflow.version }),
    );
    if (done) navigate('/workflows');
  };
  return html`<h1>${workflow.name}</h1>
    <p>${workflow.description}</p>
    <div class="row">
      <${Link} href=${`/workflows/${workflow.id}/edit`} class="button">Edit</${Link}>
      <button class="danger" onClick=${remove}>Delete</button>
      <span class="muted">version ${workflow.version}</span>
    </div>
    <section class="card"><${Dag} steps=${workflow.steps.map((step) => ({ key: step.key, dependsOn: step.dependsOn }))} /></section>
    <form class="stack card" onSubmit=${execute} aria-label="execute">
      <label>Input (JSON) <textarea name="input" rows="4" value=${inputText}
        onInput=${(event: Event) => setInput((event.target as HTMLTextAreaElement).value)}></textarea></label>
      <${RefusalBox} refusal=${refusal} />
      <button type="submit" disabled=${busy}>Execute</button>
    </form>
    <h2>Recent executions</h2>
    <table class="list" aria-label="executions">
      <thead><tr><th>Execution</th><th>Status</th><th>Created</th></tr></thead>
      <tbody>
        ${(executions.data?.executions ?? []).map(
          (execution) => html`<tr>
            <td><${Link} href=${`/executions/${execution.id}`}>${shortId(execution.id)}</${Link}></td>
            <td class="status-${ExecutionStatus[execution.status]}">${ExecutionStatus[execution.status]}</td>
            <td>${when(execution.createdAt)}</td>
          </tr>`,
        )}
      </tbody>
    </table>`;
}
