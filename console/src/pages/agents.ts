// Agents: list with search, a type filter and pages; create one of each type, edit (a stale
// version is shown as a conflict), delete.
import { create } from '@bufbuild/protobuf';
import { useState } from 'preact/hooks';
import { client } from '../api';
import {
  AgentConfigSchema,
  AgentSchema,
  AgentService,
  AgentType,
  CodeLanguage,
  CodeNetwork,
  HttpMethod,
  type Agent,
} from '../gen/turbocat/v1/agent_pb';
import { html, Pager, RefusalBox, useAction, useLoad, when } from '../ui';

const TYPES = [AgentType.CODE, AgentType.API, AgentType.LLM, AgentType.DATA, AgentType.WORKFLOW];

interface Draft {
  name: string;
  description: string;
  type: AgentType;
  language: CodeLanguage;
  source: string;
  network: boolean;
  url: string;
  method: HttpMethod;
  body: string;
  baseUrl: string;
  model: string;
  prompt: string;
  jq: string;
  workflowId: string;
}

function emptyDraft(): Draft {
  return {
    name: '',
    description: '',
    type: AgentType.DATA,
    language: CodeLanguage.PYTHON,
    source: 'import json, sys\ndata = json.load(sys.stdin)\nprint(json.dumps(data))\n',
    network: false,
    url: 'https://example.com/',
    method: HttpMethod.GET,
    body: '',
    baseUrl: 'https://api.openai.com/v1',
    model: 'gpt-4o-mini',
    prompt: 'Summarise: {{input}}',
    jq: '.',
    workflowId: '',
  };
}

function draftOf(agent: Agent): Draft {
  const draft = { ...emptyDraft(), name: agent.name, description: agent.description, type: agent.type };
  const kind = agent.config?.kind;
  if (kind?.case === 'code') {
    Object.assign(draft, {
      language: kind.value.language,
      source: kind.value.source,
      network: kind.value.network === CodeNetwork.ON,
    });
  } else if (kind?.case === 'api') {
    Object.assign(draft, { url: kind.value.urlTemplate, method: kind.value.method, body: kind.value.bodyTemplate });
  } else if (kind?.case === 'llm') {
    Object.assign(draft, { baseUrl: kind.value.baseUrl, model: kind.value.model, prompt: kind.value.promptTemplate });
  } else if (kind?.case === 'data') {
    draft.jq = kind.value.jqProgram;
  } else if (kind?.case === 'workflow') {
    draft.workflowId = kind.value.workflowId;
  }
  return draft;
}

function configOf(draft: Draft) {
  switch (draft.type) {
    case AgentType.CODE:
      return create(AgentConfigSchema, {
        kind: {
          case: 'code',
          value: {
            language: draft.language,
            source: draft.source,
            network: draft.network ? CodeNetwork.ON : CodeNetwork.OFF,
          },
        },
      });
    case AgentType.API:
      return create(AgentConfigSchema, {
        kind: { case: 'api', value: { method: draft.method, urlTemplate: draft.url, bodyTemplate: draft.body } },
      });
    case AgentType.LLM:
      return create(AgentConfigSchema, {
        kind: { case: 'llm', value: { baseUrl: draft.baseUrl, model: draft.model, promptTemplate: draft.prompt } },
      });
    case AgentType.WORKFLOW:
      return create(AgentConfigSchema, { kind: { case: 'workflow', value: { workflowId: draft.workflowId } } });
    default:
      return create(AgentConfigSchema, { kind: { case: 'data', value: { jqProgram: draft.jq } } });
  }
}

export function AgentsPage() {
  const [search, setSearch] = useState('');
  const [type, setType] = useState(AgentType.UNSPECIFIED);
  const [page, setPage] = useState(1);
  const [editing, setEditing] = useState<Agent | 'new' | null>(null);
  const list = useLoad(
    () => client(AgentService).listAgents({ page, pageSize: 20, search, type }),
    [page, search, type],
  );
  const [refusal, , run] = useAction();
  const remove = async (agent: Agent) => {
    if (!confirm(`Delete agent ${agent.name}?`)) return;
    await run(() => client(AgentService).deleteAgent({ agentId: agent.id, version: agent.version }));
    list.reload();
  };
  return html`<h1>Agents</h1>
    <div class="toolbar">
      <input type="search" aria-label="search agents" placeholder="Search" value=${search}
        onInput=${(event: Event) => (setSearch((event.target as HTMLInputElement).value), setPage(1))} />
      <select aria-label="type filter" value=${type}
        onChange=${(event: Event) => (setType(Number((event.target as HTMLSelectElement).value)), setPage(1))}>
        <option value=${AgentType.UNSPECIFIED}>All types</option>
        ${TYPES.map((value) => html`<option value=${value}>${AgentType[value]}</option>`)}
      </select>
      <button onClick=${() => setEditing('new')}>New agent</button>
    </div>
    ${editing
      ? html`<${AgentForm} agent=${editing === 'new' ? null : editing}
          onDone=${() => (setEditing(null), list.reload())} onCancel=${() => setEditing(null)} />`
      : null}
    <${RefusalBox} refusal=${list.refusal ?? refusal} />
    <table class="list" aria-label="agents">
      <thead><tr><th>Name</th><th>Type</th><th>Version</th><th>Updated</th><th></th></tr></thead>
      <tbody>
        ${(list.data?.agents ?? []).map(
          (agent) => html`<tr data-agent=${agent.name}>
            <td>${agent.name}</td><td>${AgentType[agent.type]}</td><td>${agent.version}</td>
            <td>${when(agent.updatedAt)}</td>
            <td class="actions">
              <button onClick=${() => setEditing(agent)}>Edit</button>
              <button class="danger" onClick=${() => remove(agent)}>Delete</button>
            </td>
          </tr>`,
        )}
      </tbody>
    </table>
    <${Pager} page=${page} totalPages=${list.data?.pagination?.totalPages ?? 1} onPage=${setPage} />`;
}

function AgentForm(props: { agent: Agent | null; onDone: () => void; onCancel: () => void }) {
  const [draft, setDraft] = useState<Draft>(props.agent ? draftOf(props.agent) : emptyDraft());
  const [refusal, busy, run] = useAction();
  const set = (field: keyof Draft, parse: (value: string) => unknown = (value) => value) => (event: Event) => {
    const target = event.target as HTMLInputElement;
    setDraft({ ...draft, [field]: target.type === 'checkbox' ? target.checked : parse(target.value) });
  };
  const submit = async (event: Event) => {
    event.preventDefault();
    const agent = create(AgentSchema, {
      id: props.agent?.id ?? '',
      version: props.agent?.version ?? 0,
      name: draft.name,
      description: draft.description,
      type: draft.type,
      config: configOf(draft),
    });
    const done = await run<unknown>(() =>
      props.agent
        ? client(AgentService).updateAgent({
            agent,
            updateMask: { paths: ['name', 'description', 'config'] },
          })
        : client(AgentService).createAgent({ agent }),
    );
    if (done) props.onDone();
  };
  const type = draft.type;
  return html`<form class="card stack" onSubmit=${submit} aria-label="agent form">
    <h2>${props.agent ? `Edit ${props.agent.name}` : 'New agent'}</h2>
    <label>Name <input name="name" required value=${draft.name} onInput=${set('name')} /></label>
    <label>Description <input name="description" value=${draft.description} onInput=${set('description')} /></label>
    <label>Type
      <select name="type" value=${type} disabled=${!!props.agent} onChange=${set('type', Number)}>
        ${TYPES.map((value) => html`<option value=${value}>${AgentType[value]}</option>`)}
      </select>
    </label>
    ${type === AgentType.CODE
      ? html`<label>Language
          <select name="language" value=${draft.language} onChange=${set('language', Number)}>
            <option value=${CodeLanguage.PYTHON}>Python</option>
            <option value=${CodeLanguage.JAVASCRIPT}>JavaScript</option>
          </select></label>
          <label>Source <textarea name="source" rows="8" value=${draft.source} onInput=${set('source')}></textarea></label>
          <label class="inline"><input type="checkbox" name="network" checked=${draft.network} onChange=${set('network')} /> Network</label>`
      : null}
    ${type === AgentType.API
      ? html`<label>Method
          <select name="method" value=${draft.method} onChange=${set('method', Number)}>
            ${[HttpMethod.GET, HttpMethod.POST, HttpMethod.PUT, HttpMethod.PATCH, HttpMethod.DELETE].map(
              (value) => html`<option value=${value}>${HttpMethod[value]}</option>`,
            )}
          </select></label>
          <label>URL template <input name="url" value=${draft.url} onInput=${set('url')} /></label>
          <label>Body template <textarea name="body" rows="3" value=${draft.body} onInput=${set('body')}></textarea></label>`
      : null}
    ${type === AgentType.LLM
      ? html`<label>Base URL <input name="baseUrl" value=${draft.baseUrl} onInput=${set('baseUrl')} /></label>
          <label>Model <input name="model" value=${draft.model} onInput=${set('model')} /></label>
          <label>Prompt template <textarea name="prompt" rows="3" value=${draft.prompt} onInput=${set('prompt')}></textarea></label>`
      : null}
    ${type === AgentType.DATA
      ? html`<label>jq program <textarea name="jq" rows="3" value=${draft.jq} onInput=${set('jq')}></textarea></label>`
      : null}
    ${type === AgentType.WORKFLOW
      ? html`<label>Workflow id <input name="workflowId" value=${draft.workflowId} onInput=${set('workflowId')} /></label>`
      : null}
    <${RefusalBox} refusal=${refusal} />
    <div class="row">
      <button type="submit" disabled=${busy}>${props.agent ? 'Save' : 'Create'}</button>
      <button type="button" onClick=${props.onCancel}>Cancel</button>
    </div>
  </form>`;
}
