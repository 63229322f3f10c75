// Templates (instantiate, delete), deployments (create a manual one, start, stop, delete),
// runners and system health, and (for administrators) users and their roles.
import { create, fromJson, toJson, type JsonObject } from '@bufbuild/protobuf';
import { useState } from 'preact/hooks';
import { client, parseJson } from '../api';
import { AgentType } from '../gen/turbocat/v1/agent_pb';
import { AnalyticsService, ComponentStatus } from '../gen/turbocat/v1/analytics_pb';
import {
  DeploymentEnvironment,
  DeploymentSchema,
  DeploymentService,
  DeploymentStatus,
  TriggerType,
  type Deployment,
} from '../gen/turbocat/v1/deployment_pb';
import { RunnerService } from '../gen/turbocat/v1/runner_pb';
import { TemplateKind, TemplateSchema, TemplateService, type Template } from '../gen/turbocat/v1/template_pb';
import { UserRole, UserService, type User } from '../gen/turbocat/v1/user_pb';
import { WorkflowService } from '../gen/turbocat/v1/workflow_pb';
import { html, Link, navigate, Pager, RefusalBox, useAction, useLoad, when } from '../ui';

const input = (set: (value: string) => void) => (event: Event) =>
  set((event.target as HTMLInputElement).value);

/** Edits a resource's name and description (and what `extra` adds), saving with its version:
 * a stale version comes back as a conflict and is shown as one. */
function EditForm(props: {
  title: string;
  name: string;
  description: string;
  onSave: (name: string, description: string) => Promise<unknown>;
  onDone: () => void;
}) {
  const [name, setName] = useState(props.name);
  const [description, setDescription] = useState(props.description);
  const [refusal, busy, run] = useAction();
  const submit = async (event: Event) => {
    event.preventDefault();
    if (await run(() => props.onSave(name, description))) props.onDone();
  };
  return html`<form class="card stack" onSubmit=${submit} aria-label=${props.title}>
    <h2>${props.title}</h2>
    <label>Name <input name="name" required value=${name} onInput=${input(setName)} /></label>
    <label>Description <input name="description" value=${description} onInput=${input(setDescription)} /></label>
    <${RefusalBox} refusal=${refusal} />
    <div class="row">
      <button type="submit" disabled=${busy}>Save</button>
      <button type="button" onClick=${props.onDone}>Cancel</button>
    </div>
  </form>`;
}

const TEMPLATE_EXAMPLE_PARAMETERS = '[{"name": "program", "type": "STRING", "defaultValue": "."}]';
const TEMPLATE_EXAMPLE_BODY = '{"type": "DATA", "config": {"data": {"jqProgram": "{{params.program}}"}}}';

/** Creates a template, or edits one (`existing`: its kind stays; everything else may change). */
function TemplateForm(props: { existing?: Template; onDone: () => void }) {
  const existing = props.existing;
  const saved = existing ? (toJson(TemplateSchema, existing) as JsonObject) : null;
  const [name, setName] = useState(existing?.name ?? '');
  const [description, setDescription] = useState(existing?.description ?? '');
  const [kind, setKind] = useState(existing ? TemplateKind[existing.kind] : 'AGENT');
  const [category, setCategory] = useState(existing?.category ?? '');
  const [parameters, setParameters] = useState(
    saved ? JSON.stringify(saved.parameters ?? [], null, 2) : TEMPLATE_EXAMPLE_PARAMETERS,
  );
  const [body, setBody] = useState(saved ? JSON.stringify(saved.body ?? {}, null, 2) : TEMPLATE_EXAMPLE_BODY);
  const [refusal, busy, run] = useAction();
  const submit = async (event: Event) => {
    event.preventDefault();
    const done = await run(() => {
      // The REST edge's short enum names (`STRING`) are accepted here too.
      const parameterList = ((parseJson(parameters, 'parameters') ?? []) as JsonObject[]).map((parameter) => {
        const type = typeof parameter.type === 'string' ? parameter.type : '';
        return type && !type.startsWith('PARAMETER_TYPE_') ? { ...parameter, type: `PARAMETER_TYPE_${type}` } : parameter;
      });
      const template = fromJson(TemplateSchema, {
        ...(existing ? { id: existing.id, version: existing.version } : {}),
        name,
        description,
        kind: `TEMPLATE_KIND_${kind}`,
        category,
        parameters: parameterList,
        body: parseJson(body, 'body') as JsonObject,
      });
      if (existing) {
        const updateMask = { paths: ['name', 'description', 'category', 'parameters', 'body'] };
        return client(TemplateService).updateTemplate({ template, updateMask }).then((answer) => answer.template);
      }
      return client(TemplateService).createTemplate({ template }).then((answer) => answer.template);
    });
    if (done) props.onDone();
  };
  const title = existing ? `Edit ${existing.name}` : 'New template';
  return html`<form class="card stack" onSubmit=${submit} aria-label=${existing ? `Edit ${existing.name}` : 'new template'}>
    <h2>${title}</h2>
    <label>Name <input name="name" required value=${name} onInput=${input(setName)} /></label>
    <label>Description <input name="description" value=${description} onInput=${input(setDescription)} /></label>
    <label>Kind <select name="kind" value=${kind} disabled=${Boolean(existing)} onChange=${input(setKind)}>
      <option value="AGENT">AGENT</option><option value="WORKFLOW">WORKFLOW</option>
    </select></label>
    <label>Category <input name="category" value=${category} onInput=${input(setCategory)} /></label>
    <label>Parameters (JSON) <textarea name="parameters" rows="3" value=${parameters} onInput=${input(setParameters)}></textarea></label>
    <label>Body (JSON; {{params.name}} where a parameter goes) <textarea name="body" rows="6" value=${body} onInput=${input(setBody)}></textarea></label>
    <${RefusalBox} refusal=${refusal} />
    <div class="row">
      <button type="submit" disabled=${busy}>${existing ? 'Save' : 'Create'}</button>
      <button type="button" onClick=${props.onDone}>Cancel</button>
    </div>
  </form>`;
}

export function TemplatesPage() {
  const [search, setSearch] = useState('');
  const [kind, setKind] = useState(TemplateKind.UNSPECIFIED);
  const [page, setPage] = useState(1);
  const list = useLoad(
    () => client(TemplateService).listTemplates({ page, pageSize: 20, search, kind }),
    [page, search, kind],
  );
  const [refusal, busy, run] = useAction();
  const [editing, setEditing] = useState<Template | 'new' | null>(null);
  const instantiate = async (template: Template) => {
    const name = prompt(`Name for the new ${TemplateKind[template.kind].toLowerCase()}`, template.name);
    if (name === null) return;
    const answer = await run(() => client(TemplateService).instantiateTemplate({ templateId: template.id, name }));
    if (answer?.workflowId) navigate(`/workflows/${answer.workflowId}`);
    else if (answer) navigate('/agents');
  };
  const remove = async (template: Template) => {
    if (!confirm(`Delete template ${template.name}?`)) return;
    await run(() => client(TemplateService).deleteTemplate({ templateId: template.id, version: template.version }));
    list.reload();
  };
  return html`<h1>Templates</h1>
    <div class="toolbar">
      <input type="search" aria-label="search templates" placeholder="Search" value=${search}
        onInput=${(event: Event) => (setSearch((event.target as HTMLInputElement).value), setPage(1))} />
      <select aria-label="kind filter" value=${kind} onChange=${(event: Event) => (setKind(Number((event.target as HTMLSelectElement).value)), setPage(1))}>
        <option value=${TemplateKind.UNSPECIFIED}>All kinds</option>
        <option value=${TemplateKind.AGENT}>AGENT</option>
        <option value=${TemplateKind.WORKFLOW}>WORKFLOW</option>
      </select>
      <button onClick=${() => setEditing('new')}>New template</button>
    </div>
    ${editing === 'new' ? html`<${TemplateForm} onDone=${() => (setEditing(null), list.reload())} />` : null}
    ${editing && editing !== 'new'
      ? html`<${TemplateForm} key=${editing.id} existing=${editing} onDone=${() => (setEditing(null), list.reload())} />`
      : null}
    <${RefusalBox} refusal=${list.refusal ?? refusal} />
    <table class="list" aria-label="templates">
      <thead><tr><th>Name</th><th>Kind</th><th>Category</th><th>Description</th><th></th></tr></thead>
      <tbody>
        ${(list.data?.templates ?? []).map(
          (template) => html`<tr data-template=${template.name}>
            <td>${template.name}</td><td>${TemplateKind[template.kind]}</td><td>${template.category}</td><td>${template.description}</td>
            <td class="actions">
              <button disabled=${busy} onClick=${() => instantiate(template)}>Instantiate</button>
              ${template.builtin
                ? null
                : html`<button onClick=${() => setEditing(template)}>Edit</button>
                    <button class="danger" onClick=${() => remove(template)}>Delete</button>`}
            </td>
          </tr>`,
        )}
      </tbody>
    </table>
    <${Pager} page=${page} totalPages=${list.data?.pagination?.totalPages ?? 1} onPage=${setPage} />`;
}

export function DeploymentsPage() {
  const [search, setSearch] = useState('');
  const [page, setPage] = useState(1);
  const list = useLoad(
    () => client(DeploymentService).listDeployments({ page, pageSize: 20, search }),
    [page, search],
  );
  const workflows = useLoad(() => client(WorkflowService).listWorkflows({ pageSize: 100 }), []);
  const [name, setName] = useState('');
  const [workflowId, setWorkflowId] = useState('');
  const [cron, setCron] = useState('');
  const [editing, setEditing] = useState<Deployment | null>(null);
  const [refusal, busy, run] = useAction();
  const submit = async (event: Event) => {
    event.preventDefault();
    const deployment = create(DeploymentSchema, {
      name,
      workflowId,
      environment: DeploymentEnvironment.DEVELOPMENT,
      trigger: cron.trim()
        ? { type: TriggerType.CRON, cronExpression: cron.trim(), timezone: 'UTC' }
        : { type: TriggerType.MANUAL },
    });
    if (await run(() => client(DeploymentService).createDeployment({ deployment }))) {
      setName('');
      list.reload();
    }
  };
  const act = async (action: () => Promise<unknown>) => {
    await run(action);
    list.reload();
  };
  const service = client(DeploymentService);
  return html`<h1>Deployments</h1>
    <form class="card row" onSubmit=${submit} aria-label="new deployment">
      <label>Name <input name="name" required value=${name} onInput=${(event: Event) => setName((event.target as HTMLInputElement).value)} /></label>
      <label>Workflow
        <select name="workflow" value=${workflowId} onChange=${(event: Event) => setWorkflowId((event.target as HTMLSelectElement).value)}>
          <option value="">choose…</option>
          ${(workflows.data?.workflows ?? []).map((workflow) => html`<option value=${workflow.id}>${workflow.name}</option>`)}
        </select></label>
      <label>Cron (empty: manual) <input name="cron" placeholder="0 */5 * * * *" value=${cron} onInput=${input(setCron)} /></label>
      <button type="submit" disabled=${busy}>Create deployment</button>
    </form>
    ${editing
      ? html`<${EditForm} title=${`Edit ${editing.name}`} name=${editing.name} description=${editing.description}
          onSave=${(newName: string, description: string) =>
            client(DeploymentService).updateDeployment({
              deployment: { id: editing.id, version: editing.version, name: newName, description },
              updateMask: { paths: ['name', 'description'] },
            })}
          onDone=${() => (setEditing(null), list.reload())} />`
      : null}
    <div class="toolbar">
      <input type="search" aria-label="search deployments" placeholder="Search" value=${search}
        onInput=${(event: Event) => (setSearch((event.target as HTMLInputElement).value), setPage(1))} />
    </div>
    <${RefusalBox} refusal=${list.refusal ?? refusal} />
    <table class="list" aria-label="deployments">
      <thead><tr><th>Name</th><th>Trigger</th><th>Status</th><th>Last triggered</th><th>Next run</th><th></th></tr></thead>
      <tbody>
        ${(list.data?.deployments ?? []).map(
          (deployment: Deployment) => html`<tr data-deployment=${deployment.name}>
            <td>${deployment.name}</td><td>${TriggerType[deployment.trigger?.type ?? 0]}</td>
            <td>${DeploymentStatus[deployment.status]}</td><td>${when(deployment.lastTriggeredAt)}</td>
            <td>${when(deployment.nextRunAt)}</td>
            <td class="actions">
              <button onClick=${() => setEditing(deployment)}>Edit</button>
              <button onClick=${() => act(() => service.startDeployment({ deploymentId: deployment.id }))}>Start</button>
              <button onClick=${() => act(() => service.stopDeployment({ deploymentId: deployment.id }))}>Stop</button>
              <button class="danger" onClick=${() => confirm(`Delete deployment ${deployment.name}?`) && act(() => service.deleteDeployment({ deploymentId: deployment.id, version: deployment.version }))}>Delete</button>
            </td>
          </tr>`,
        )}
      </tbody>
    </table>
    <${Pager} page=${page} totalPages=${list.data?.pagination?.totalPages ?? 1} onPage=${setPage} />`;
}

export function RunnersPage() {
  const runners = useLoad(() => client(RunnerService).listRunners({ pageSize: 100 }), []);
  const health = useLoad(() => client(AnalyticsService).getSystemHealth({}), []);
  return html`<h1>Runners</h1>
    <${RefusalBox} refusal=${runners.refusal} />
    <table class="list" aria-label="runners">
      <thead><tr><th>Name</th><th>Labels</th><th>Agent types</th><th>Load / capacity</th><th>Last heartbeat</th></tr></thead>
      <tbody>
        ${(runners.data?.runners ?? []).map(
          (runner) => html`<tr data-runner=${runner.name}>
            <td>${runner.name}${runner.draining ? ' (draining)' : ''}</td>
            <td>${Object.entries(runner.labels).map(([key, value]) => `${key}=${value}`).join(', ')}</td>
            <td>${runner.agentTypes.map((type) => AgentType[type]).join(', ')}</td>
            <td>${runner.load} / ${runner.capacity}</td><td>${when(runner.lastHeartbeatAt)}</td>
          </tr>`,
        )}
      </tbody>
    </table>
    <h2>System health</h2>
    <${RefusalBox} refusal=${health.refusal} />
    ${health.data
      ? html`<p><span class="badge">${ComponentStatus[health.data.status]}</span>
            ${health.data.mode} · version ${health.data.version} · up ${Math.round(health.data.uptimeSeconds)} s</p>
          <table class="list" aria-label="components">
            <thead><tr><th>Component</th><th>Status</th><th>Backend</th><th>Latency</th><th>Message</th></tr></thead>
            <tbody>
              ${health.data.components.map(
                (component) => html`<tr><td>${component.name}</td><td>${ComponentStatus[component.status]}</td>
                  <td>${component.backend}</td><td>${component.latencyMs.toFixed(1)} ms</td><td>${component.message}</td></tr>`,
              )}
            </tbody>
          </table>`
      : null}`;
}

export function UsersPage() {
  const [search, setSearch] = useState('');
  const [page, setPage] = useState(1);
  const list = useLoad(() => client(UserService).listUsers({ page, pageSize: 20, search }), [page, search]);
  const [refusal, , run] = useAction();
  const setRole = async (user: User, role: UserRole) => {
    await run(() => client(UserService).updateUserRole({ userId: user.id, role, version: user.version }));
    list.reload();
  };
  return html`<h1>Users</h1>
    <div class="toolbar">
      <input type="search" aria-label="search users" placeholder="Search" value=${search}
        onInput=${(event: Event) => (setSearch((event.target as HTMLInputElement).value), setPage(1))} />
    </div>
    <${RefusalBox} refusal=${list.refusal ?? refusal} />
    <table class="list" aria-label="users">
      <thead><tr><th>Email</th><th>Name</th><th>Role</th><th>Last sign-in</th></tr></thead>
      <tbody>
        ${(list.data?.users ?? []).map(
          (user) => html`<tr>
            <td>${user.email}</td><td>${user.fullName}</td>
            <td><select aria-label=${`role of ${user.email}`} value=${user.role}
              onChange=${(event: Event) => setRole(user, Number((event.target as HTMLSelectElement).value))}>
              ${[UserRole.ADMIN, UserRole.USER, UserRole.AGENT].map((role) => html`<option value=${role}>${UserRole[role]}</option>`)}
            </select></td>
            <td>${when(user.lastLoginAt)}</td>
          </tr>`,
        )}
      </tbody>
    </table>
    <${Pager} page=${page} totalPages=${list.data?.pagination?.totalPages ?? 1} onPage=${setPage} />
    <p><${Link} href="/">Back to the dashboard</${Link}></p>`;
}
