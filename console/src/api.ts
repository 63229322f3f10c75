// The console's only way to the server: the generated Connect-ES clients over grpc-web (binary
// protobuf, same origin), a session that refreshes its access token before it expires, and the
// server's refusals turned into { code, message, fields } for the pages.
import { BinaryReader } from '@bufbuild/protobuf/wire';
import { fromJson, toJson, type JsonValue } from '@bufbuild/protobuf';
import { ValueSchema, type Value } from '@bufbuild/protobuf/wkt';
import type { DescService } from '@bufbuild/protobuf';
import { Code, ConnectError, createClient, type Client, type Interceptor } from '@connectrpc/connect';
import { createGrpcWebTransport } from '@connectrpc/connect-web';
import { AuthService } from './gen/turbocat/v1/auth_pb';
import type { User } from './gen/turbocat/v1/user_pb';

export interface Session {
  accessToken: string;
  refreshToken: string;
  /** Milliseconds since the epoch. */
  expiresAt: number;
  user: { id: string; email: string; fullName: string; role: number };
}

const STORAGE_KEY = 'turbocat.session';
let session: Session | null = readStoredSession();
let refreshTimer: ReturnType<typeof setTimeout> | undefined;
let refreshing: Promise<void> | null = null;
const listeners = new Set<(session: Session | null) => void>();

function readStoredSession(): Session | null {
  try {
    const text = localStorage.getItem(STORAGE_KEY);
    return text ? (JSON.parse(text) as Session) : null;
  } catch {
    return null;
  }
}

export function currentSession(): Session | null {
  return session;
}

export function onSessionChange(listener: (session: Session | null) => void): () => void {
  listeners.add(listener);
  return () => listeners.delete(listener);
}

export function setSession(next: Session | null): void {
  session = next;
  if (next) localStorage.setItem(STORAGE_KEY, JSON.stringify(next));
  else localStorage.removeItem(STORAGE_KEY);
  scheduleRefresh();
  for (const listener of listeners) listener(next);
}

export function sessionFrom(answer: {
  user?: User;
  accessToken: string;
  refreshToken: string;
  expiresIn: number;
}): Session {
  const user = answer.user;
  return {
    accessToken: answer.accessToken,
    refreshToken: answer.refreshToken,
    expiresAt: Date.now() + answer.expiresIn * 1000,
    user: {
      id: user?.id ?? '',
      email: user?.email ?? '',
      fullName: user?.fullName ?? '',
      role: user?.role ?? 0,
    },
  };
}

/** Refreshes a minute before expiry (or at 80 % of a shorter lifetime). */
function scheduleRefresh(): void {
  if (refreshTimer) clearTimeout(refreshTimer);
  refreshTimer = undefined;
  if (!session) return;
  const remaining = session.expiresAt - Date.now();
  const margin = Math.min(60_000, remaining * 0.2);
  refreshTimer = setTimeout(() => void refreshNow(), Math.max(0, remaining - margin));
}

export function refreshNow(): Promise<void> {
  if (refreshing) return refreshing;
  const current = session;
  if (!current) return Promise.resolve();
  refreshing = (async () => {
    try {
      const answer = await publicClient(AuthService).refreshToken({
        refreshToken: current.refreshToken,
      });
      setSession(sessionFrom(answer));
    } catch (error) {
      // A refresh token that no longer works ends the session; a network blip tries again.
      if (error instanceof ConnectError && error.code === Code.Unauthenticated) setSession(null);
      else refreshTimer = setTimeout(() => void refreshNow(), 5_000);
    } finally {
      refreshing = null;
    }
  })();
  return refreshing;
}

scheduleRefresh();

const authenticate: Interceptor = (next) => async (request) => {
  if (session && session.expiresAt - Date.now() < 10_000) await refreshNow();
  if (session) request.header.set('authorization', `Bearer ${session.accessToken}`);
  return next(request);
};

const transport = createGrpcWebTransport({
  baseUrl: location.origin,
  useBinaryFormat: true,
  interceptors: [authenticate],
});
const anonymousTransport = createGrpcWebTransport({
  baseUrl: location.origin,
  useBinaryFormat: true,
});

const clients = new Map<DescService, unknown>();
/** The client of one service, calling with the session's access token. */
export function client<T extends DescService>(service: T): Client<T> {
  let existing = clients.get(service) as Client<T> | undefined;
  if (!existing) {
    existing = createClient(service, transport);
    clients.set(service, existing);
  }
  return existing;
}

/** For sign in, register and refresh: no token. */
export function publicClient<T extends DescService>(service: T): Client<T> {
  return createClient(service, anonymousTransport);
}

export interface Refusal {
  code: string;
  message: string;
  fields: { field: string; description: string }[];
}

/** The server's refusal as the page shows it: its code, message and every field it names. */
export function refusal(error: unknown): Refusal {
  if (!(error instanceof ConnectError)) {
    return { code: 'ERROR', message: String(error instanceof Error ? error.message : error), fields: [] };
  }
  const fields: Refusal['fields'] = [];
  let code = Code[error.code] ?? 'UNKNOWN';
  for (const detail of error.details) {
    if (!('type' in detail) || !(detail.value instanceof Uint8Array)) continue;
    if (detail.type === 'google.rpc.BadRequest') fields.push(...fieldViolations(detail.value));
    if (detail.type === 'google.rpc.ErrorInfo') code = errorInfoReason(detail.value) || code;
  }
  return { code, message: error.rawMessage, fields };
}

// google.rpc.BadRequest { repeated FieldViolation field_violations = 1; }
// google.rpc.BadRequest.FieldViolation { string field = 1; string description = 2; }
function fieldViolations(bytes: Uint8Array): Refusal['fields'] {
  const found: Refusal['fields'] = [];
  const reader = new BinaryReader(bytes);
  while (reader.pos < reader.len) {
    const [number, wireType] = reader.tag();
    if (number !== 1) {
      reader.skip(wireType);
      continue;
    }
    const inner = new BinaryReader(reader.bytes());
    const violation = { field: '', description: '' };
    while (inner.pos < inner.len) {
      const [innerNumber, innerWireType] = inner.tag();
      if (innerNumber === 1) violation.field = inner.string();
      else if (innerNumber === 2) violation.description = inner.string();
      else inner.skip(innerWireType);
    }
    found.push(violation);
  }
  return found;
}

// google.rpc.ErrorInfo { string reason = 1; string domain = 2; map<string,string> metadata = 3; }
function errorInfoReason(bytes: Uint8Array): string {
  const reader = new BinaryReader(bytes);
  while (reader.pos < reader.len) {
    const [number, wireType] = reader.tag();
    if (number === 1) return reader.string();
    reader.skip(wireType);
  }
  return '';
}

export function valueToJson(value: Value | undefined): JsonValue | undefined {
  return value ? toJson(ValueSchema, value) : undefined;
}

export function jsonToValue(json: JsonValue): Value {
  return fromJson(ValueSchema, json);
}

/** Pretty JSON of a google.protobuf.Value, or an empty string. */
export function showValue(value: Value | undefined): string {
  const json = valueToJson(value);
  return json === undefined ? '' : JSON.stringify(json, null, 2);
}

/** A JSON text the user typed, or a refusal naming the field. */
export function parseJson(text: string, field: string): JsonValue {
  if (!text.trim()) return null;
  try {
    return JSON.parse(text) as JsonValue;
  } catch (error) {
    throw Object.assign(new Error(`${field} is not valid JSON`), {
      refusal: {
        code: 'INVALID_JSON',
        message: `${field} is not valid JSON`,
        fields: [{ field, description: String(error) }],
      } satisfies Refusal,
    });
  }
}

export function asRefusal(error: unknown): Refusal {
  if (error && typeof error === 'object' && 'refusal' in error) return (error as { refusal: Refusal }).refusal;
  return refusal(error);
}
