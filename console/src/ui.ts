// Small pieces every page uses: the htm binding, client-side navigation, the refusal box,
// formatting of times, durations and enum names.
import { h, type ComponentChildren } from 'preact';
import { useCallback, useEffect, useState } from 'preact/hooks';
import htm from 'htm';
import { timestampDate, type Timestamp } from '@bufbuild/protobuf/wkt';
import { asRefusal, type Refusal } from './api';

export const html = htm.bind(h);

export function navigate(to: string): void {
  history.pushState(null, '', to);
  dispatchEvent(new PopStateEvent('popstate'));
}

export function usePath(): string {
  const [path, setPath] = useState(location.pathname + location.search);
  useEffect(() => {
    const update = () => setPath(location.pathname + location.search);
    addEventListener('popstate', update);
    return () => removeEventListener('popstate', update);
  }, []);
  return path;
}

export function Link(props: { href: string; class?: string; children?: ComponentChildren }) {
  const follow = (event: MouseEvent) => {
    if (event.button !== 0 || event.metaKey || event.ctrlKey || event.shiftKey || event.altKey) return;
    event.preventDefault();
    navigate(props.href);
  };
  return html`<a href=${props.href} class=${props.class} onClick=${follow}>${props.children}</a>`;
}

/** A refusal from the server: its code, message and each field it names. */
export function RefusalBox(props: { refusal: Refusal | null }) {
  const refusal = props.refusal;
  if (!refusal) return null;
  const conflict = refusal.code === 'CONFLICT' || refusal.code === 'Aborted' || refusal.code === 'ABORTED';
  return html`<div class="refusal" role="alert" data-code=${refusal.code}>
    <strong>${conflict ? 'Conflict: ' : ''}${refusal.message}</strong>
    <span class="code"> (${refusal.code})</span>
    ${conflict
      ? html`<p>Someone changed this since you opened it. Reload to see the current version, then apply your change again.</p>`
      : null}
    ${refusal.fields.length
      ? html`<ul class="fields">
          ${refusal.fields.map(
            (field) => html`<li><code class="field">${field.field}</code>: ${field.description}</li>`,
          )}
        </ul>`
      : null}
  </div>`;
}

/** Runs an action, keeping its refusal (or null) and whether it is running. */
export function useAction(): [
  Refusal | null,
  boolean,
  <T>(action: () => Promise<T>) => Promise<T | undefined>,
  (refusal: Refusal | null) => void,
] {
  const [refusal, setRefusal] = useState<Refusal | null>(null);
  const [busy, setBusy] = useState(false);
  const run = useCallback(async <T,>(action: () => Promise<T>) => {
    setBusy(true);
    setRefusal(null);
    try {
      return await action();
    } catch (error) {
      setRefusal(asRefusal(error));
      return undefined;
    } finally {
      setBusy(false);
    }
  }, []);
  return [refusal, busy, run, setRefusal];
}

/** Loads data for a page; reload() loads again. */
export function useLoad<T>(load: () => Promise<T>, dependencies: unknown[]) {
  const [data, setData] = useState<T | undefined>(undefined);
  const [refusal, setRefusal] = useState<Refusal | null>(null);
  const [generation, setGeneration] = useState(0);
  useEffect(() => {
    let live = true;
    load().then(
      (value) => live && (setData(value), setRefusal(null)),
      (error) => live && setRefusal(asRefusal(error)),
    );
    return () => {
      live = false;
    };
  }, [...dependencies, generation]);
  return { data, refusal, reload: () => setGeneration((value) => value + 1) };
}

export function when(timestamp: Timestamp | undefined): string {
  if (!timestamp) return '—';
  return timestampDate(timestamp).toISOString().replace('T', ' ').replace(/\.\d+Z$/, 'Z');
}

/** The enum value's name without its prefix: STEP_RUN_STATUS_RUNNING -> RUNNING. */
export function enumName(names: Record<number, string>, value: number, prefix: string): string {
  const name = names[value] ?? String(value);
  return name.startsWith(prefix) ? name.slice(prefix.length) : name;
}

export function seconds(value: number): string {
  if (!Number.isFinite(value)) return '—';
  return value < 1 ? `${Math.round(value * 1000)} ms` : `${value.toFixed(2)} s`;
}

export function Pager(props: {
  page: number;
  totalPages: number;
  onPage: (page: number) => void;
}) {
  if (props.totalPages <= 1) return null;
  return html`<nav class="pager" aria-label="pages">
    <button disabled=${props.page <= 1} onClick=${() => props.onPage(props.page - 1)}>Previous</button>
    <span>page ${props.page} of ${props.totalPages}</span>
    <button disabled=${props.page >= props.totalPages} onClick=${() => props.onPage(props.page + 1)}>
      Next
    </button>
  </nav>`;
}
