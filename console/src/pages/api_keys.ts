// API keys: create with scopes (the key is shown once), list, revoke.
import { useState } from 'preact/hooks';
import { client } from '../api';
import { ApiKeyScope, ApiKeyService } from '../gen/turbocat/v1/api_key_pb';
import { html, Pager, RefusalBox, useAction, useLoad, when } from '../ui';

const SCOPES = [ApiKeyScope.READ, ApiKeyScope.WRITE, ApiKeyScope.RUNNER];

export function ApiKeysPage() {
  const [page, setPage] = useState(1);
  const list = useLoad(() => client(ApiKeyService).listApiKeys({ page, pageSize: 20 }), [page]);
  const [name, setName] = useState('');
  const [scopes, setScopes] = useState<ApiKeyScope[]>([ApiKeyScope.READ]);
  const [created, setCreated] = useState<{ name: string; key: string } | null>(null);
  const [refusal, busy, run] = useAction();
  const toggle = (scope: ApiKeyScope) =>
    setScopes(scopes.includes(scope) ? scopes.filter((value) => value !== scope) : [...scopes, scope]);
  const submit = async (event: Event) => {
    event.preventDefault();
    const answer = await run(() => client(ApiKeyService).createApiKey({ name, scopes }));
    if (answer) {
      setCreated({ name: answer.apiKey?.name ?? name, key: answer.key });
      setName('');
      list.reload();
    }
  };
  const revoke = async (apiKeyId: string, keyName: string) => {
    if (!confirm(`Revoke API key ${keyName}?`)) return;
    await run(() => client(ApiKeyService).deleteApiKey({ apiKeyId }));
    list.reload();
  };
  return html`<h1>API keys</h1>
    <form class="card stack" onSubmit=${submit} aria-label="new API key">
      <label>Name <input name="name" required value=${name} onInput=${(event: Event) => setName((event.target as HTMLInputElement).value)} /></label>
      <fieldset class="row"><legend>Scopes</legend>
        ${SCOPES.map(
          (scope) => html`<label class="inline"><input type="checkbox" name=${`scope-${ApiKeyScope[scope]}`}
            checked=${scopes.includes(scope)} onChange=${() => toggle(scope)} /> ${ApiKeyScope[scope]}</label>`,
        )}
      </fieldset>
      <${RefusalBox} refusal=${refusal} />
      <button type="submit" disabled=${busy}>Create key</button>
    </form>
    ${created
      ? html`<div class="card once" role="status">
          <p>The key <strong>${created.name}</strong> is shown this once; copy it now.</p>
          <code class="secret" data-testid="new-key">${created.key}</code>
          <button onClick=${() => setCreated(null)}>Done</button>
        </div>`
      : null}
    <${RefusalBox} refusal=${list.refusal} />
    <table class="list" aria-label="API keys">
      <thead><tr><th>Name</th><th>Prefix</th><th>Scopes</th><th>Last used</th><th>Created</th><th></th></tr></thead>
      <tbody>
        ${(list.data?.apiKeys ?? []).map(
          (key) => html`<tr data-key=${key.name}>
            <td>${key.name}</td><td><code>${key.prefix}</code></td>
            <td>${key.scopes.map((scope) => ApiKeyScope[scope]).join(', ')}</td>
            <td>${when(key.lastUsedAt)}</td><td>${when(key.createdAt)}</td>
            <td><button class="danger" onClick=${() => revoke(key.id, key.name)}>Revoke</button></td>
          </tr>`,
        )}
      </tbody>
    </table>
    <${Pager} page=${page} totalPages=${list.data?.pagination?.totalPages ?? 1} onPage=${setPage} />`;
}
