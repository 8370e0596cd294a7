/**
 * dispatcher relay: takes batches of events over HTTP and sends each one to a Workflow
 * instance through the Workflow binding, which is not a REST API request and so is not
 * under the API's 1,200 requests / 5 minutes limit.
 *
 * POST /events
 *   Authorization: Bearer <RELAY_SECRET>
 *   {"events": [{"key", "instance_id", "type", "payload"?, "workflow"?}, ...]}
 * -> 200 {"success": true, "results": [{"key", "ok": true, "deduped": bool}
 *                                      | {"key", "ok": false, "code", "message"}]}
 *
 * One result per event, in order. Error codes:
 *   not_found        the instance does not exist (nothing was delivered)
 *   invalid          the event breaks a rule (nothing was delivered)
 *   failed           the binding failed before anything could be delivered
 *   maybe_delivered  the binding failed after the event may have been delivered
 *   in_flight        another request is sending this key right now; ask again later
 *   key_reused       the key was delivered (or is being sent) with another workflow,
 *                    instance, type or payload; nothing was sent
 *   unverifiable     the key was delivered by a relay that kept no fingerprint (before
 *                    key_reused existed): whether it was this event cannot be told
 *
 * POST /create {"instances": [{"instance_id", "params"?}, ...]}
 *   -> {"results": [{"instance_id", "outcome": "created" | "exists" | "invalid" | "failed", ...}]}
 *   one createBatch call; see handleCreate and README.md.
 * POST /status {"ids": [...]} -> {"results": [{"id", "status", "output"?, "error"?} | {"id", "code"}]}
 * POST /watch {"ids": [...], "filter"?: [event types], "timeout_ms"?: N}
 *   -> 200 NDJSON, streamed: each instance's subscribe() events as they come
 *   ({instanceId, eventId, timestamp, type, stepName?, ...}), one {"instanceId", "end"}
 *   line per instance, then {"done": true}; see handleWatch and README.md.
 *
 * Dedupe: a key whose event was delivered is remembered for DEDUPE_TTL_SECONDS with a
 * fingerprint of what was sent (SHA-256 over workflow, instance, type and the canonical
 * JSON of the payload), as Stripe's idempotency keys are. A later batch holding the key
 * with the same fingerprint answers ok with "deduped": true without sending it again; with
 * another fingerprint it answers key_reused, never ok. The delivered keys live in a
 * Durable Object (SQLite storage), sharded by a hash of the key:
 * a Durable Object reads its own writes at once and runs one request at a time, so a
 * retried batch that arrives while the first one is still in flight sees the first one's
 * claim. KV would not do: it is eventually consistent (a write can take 60 s or more to
 * be seen elsewhere), exactly the window in which a retry arrives.
 */

export interface WorkflowInstance {
  id?: string;
  sendEvent(event: { type: string; payload?: unknown }): Promise<void>;
  status(): Promise<{ status: string; error?: unknown; output?: unknown }>;
  // The platform (changelog 2026-09-15) and wrangler dev (4.164: miniflare's Engine): the
  // retained events, then new ones; ends after workflow_completed/errored/terminated.
  subscribe?(options?: { filter?: string[]; cursor?: number }): Promise<WorkflowSubscription>;
}

export interface WorkflowSubscription {
  next(): Promise<{ done: boolean; value?: Record<string, unknown> }>;
  [Symbol.dispose]?(): void;
}

export type CreateOptions = { id: string; params?: unknown };

export interface WorkflowBinding {
  get(id: string): Promise<WorkflowInstance>;
  // wrangler >= 4.148 and the platform: {instances} -> {created, errors}; before, an array
  // in and the created instances out (see handleCreate).
  createBatch(options: { instances: CreateOptions[] } | CreateOptions[]): Promise<unknown>;
}

export interface Env {
  WORKFLOW: WorkflowBinding;
  DEDUPE: DurableObjectNamespace;
  RELAY_SECRET: string;
  WORKFLOW_NAME?: string; // when set, events naming another workflow are invalid
  MAX_BATCH?: string;
  SEND_CONCURRENCY?: string;
  DEDUPE_TTL_SECONDS?: string;
  DEDUPE_SHARDS?: string;
}

// Minimal shapes of the runtime types used here, so that the Worker builds without
// @cloudflare/workers-types (wrangler's esbuild strips types, it does not check them).
interface DurableObjectNamespace {
  idFromName(name: string): DurableObjectId;
  get(id: DurableObjectId): DurableObjectStub;
}
interface DurableObjectId {}
interface DurableObjectStub {
  fetch(request: Request): Promise<Response>;
}
interface SqlStorage {
  exec(query: string, ...bindings: unknown[]): { toArray(): Record<string, unknown>[] };
}
interface DurableObjectState {
  storage: {
    sql: SqlStorage;
    getAlarm(): Promise<number | null>;
    setAlarm(when: number): Promise<void>;
  };
}

export type RelayEvent = {
  key: string;
  instance_id: string;
  type: string;
  payload?: unknown;
  workflow?: string;
  fp: string; // the event's fingerprint (fingerprint() below), set by the Worker
};

export type RelayResult =
  | { key: string; ok: true; deduped: boolean }
  | { key: string; ok: false; code: string; message: string };

/** The limits a batch is refused by (413), in the answer, so a client can tell its own
 * configuration apart from an event that is too large. */
export type RelayLimits = { max_batch: number; max_body_bytes: number };

// The Workflows API's own rules, checked before the binding sees an event.
const ID_PATTERN = /^[a-zA-Z0-9_][a-zA-Z0-9-_]*$/;
const MAX_ID_LEN = 100;
const MAX_TYPE_LEN = 100;
const MAX_KEY_LEN = 512;
const MAX_PAYLOAD_BYTES = 1024 * 1024;
// The whole request body: 100 events of up to 1 MiB would be 100 MiB, Cloudflare's
// request body limit on the Free and Pro plans; keep well under it.
const MAX_BODY_BYTES = 32 * 1024 * 1024;
const DEFAULT_MAX_BATCH = 100;
const DEFAULT_CONCURRENCY = 16;
const DEFAULT_TTL_SECONDS = 7 * 24 * 3600;
const DEFAULT_SHARDS = 16;
// A claim older than this belongs to a request that died (its isolate was evicted):
// longer than any Worker may run, so a live sender is never overtaken.
const CLAIM_EXPIRY_MS = 15 * 60 * 1000;

function intVar(value: string | undefined, fallback: number, low: number, high: number): number {
  const n = value === undefined ? NaN : Number(value);
  return Number.isInteger(n) && n >= low && n <= high ? n : fallback;
}

function json(status: number, body: unknown): Response {
  return new Response(JSON.stringify(body), {
    status,
    headers: { "Content-Type": "application/json" },
  });
}

function fail(status: number, code: number, message: string, extra: Record<string, unknown> = {}): Response {
  return json(status, { success: false, errors: [{ code, message }], messages: [], result: null, ...extra });
}

const KEY_REUSED =
  "idempotency key reused with different parameters: this key was already used for another " +
  "workflow, instance, event type or payload; nothing was sent (use a new key for a new event)";
const UNVERIFIABLE =
  "this key was delivered by an earlier relay that kept no fingerprint of the event, so " +
  "whether it was this event cannot be told; nothing was sent";

const encoder = new TextEncoder();

/** Compares two secrets in time that depends only on their lengths, never their content. */
export async function secretMatches(given: string, expected: string): Promise<boolean> {
  // Hashing first makes both sides 32 bytes, so the comparison leaks not even the length.
  const [a, b] = await Promise.all([
    crypto.subtle.digest("SHA-256", encoder.encode(given)),
    crypto.subtle.digest("SHA-256", encoder.encode(expected)),
  ]);
  const subtle = crypto.subtle as SubtleCrypto & {
    timingSafeEqual?: (x: ArrayBuffer, y: ArrayBuffer) => boolean;
  };
  if (typeof subtle.timingSafeEqual === "function") {
    return subtle.timingSafeEqual(a, b);
  }
  const x = new Uint8Array(a);
  const y = new Uint8Array(b);
  let diff = 0;
  for (let i = 0; i < x.length; i++) diff |= x[i] ^ y[i];
  return diff === 0;
}

function checkEvent(raw: unknown, env: Env): { event?: RelayEvent; error?: RelayResult } {
  if (typeof raw !== "object" || raw === null || Array.isArray(raw)) {
    return { error: { key: "", ok: false, code: "invalid", message: "an event must be an object" } };
  }
  const item = raw as Record<string, unknown>;
  const key = typeof item.key === "string" ? item.key : "";
  const bad = (message: string) => ({ error: { key, ok: false as const, code: "invalid", message } });
  if (!key || key.length > MAX_KEY_LEN) return bad(`key must be a string of 1..${MAX_KEY_LEN} characters`);
  const id = item.instance_id;
  if (typeof id !== "string" || id.length < 1 || id.length > MAX_ID_LEN || !ID_PATTERN.test(id)) {
    return bad(`instance_id must be 1..${MAX_ID_LEN} characters matching ${ID_PATTERN.source}`);
  }
  const type = item.type;
  if (typeof type !== "string" || type.length < 1 || type.length > MAX_TYPE_LEN) {
    return bad(`type must be 1..${MAX_TYPE_LEN} characters`);
  }
  if (item.workflow !== undefined && env.WORKFLOW_NAME && item.workflow !== env.WORKFLOW_NAME) {
    return bad(`this relay sends to workflow ${JSON.stringify(env.WORKFLOW_NAME)} only`);
  }
  if (item.payload !== undefined && encoder.encode(JSON.stringify(item.payload)).length > MAX_PAYLOAD_BYTES) {
    return bad(`payload is over ${MAX_PAYLOAD_BYTES} bytes`);
  }
  const workflow = typeof item.workflow === "string" ? item.workflow : env.WORKFLOW_NAME;
  return { event: { key, instance_id: id, type, payload: item.payload, workflow, fp: "" } };
}

/** JSON with every object's keys sorted (RFC 8785's order: UTF-16 code units), so the same
 * value has one text whatever the order it was written in. JSON.stringify already writes
 * numbers and strings as RFC 8785 does. */
export function canonicalJson(value: unknown): string {
  if (value === null || typeof value !== "object") return JSON.stringify(value);
  if (Array.isArray(value)) return `[${value.map(canonicalJson).join(",")}]`;
  const obj = value as Record<string, unknown>;
  const keys = Object.keys(obj).sort();
  return `{${keys.map((k) => `${JSON.stringify(k)}:${canonicalJson(obj[k])}`).join(",")}}`;
}

/** What a key's dedupe entry stands for: SHA-256 (hex) of the workflow, the instance, the
 * type and the payload (absent and null apart). Two sends with one key and one fingerprint
 * are the same event; anything else is a reused key. */
export async function fingerprint(event: RelayEvent): Promise<string> {
  const payload = event.payload === undefined ? null : canonicalJson(event.payload);
  const text = JSON.stringify([event.workflow ?? "", event.instance_id, event.type, payload]);
  const digest = new Uint8Array(await crypto.subtle.digest("SHA-256", encoder.encode(text)));
  return Array.from(digest, (b) => b.toString(16).padStart(2, "0")).join("");
}

function shardOf(key: string, shards: number): number {
  // FNV-1a: cheap, stable, spreads keys evenly enough over a few dozen shards.
  let h = 0x811c9dc5;
  for (let i = 0; i < key.length; i++) {
    h ^= key.charCodeAt(i);
    h = Math.imul(h, 0x01000193);
  }
  return (h >>> 0) % shards;
}

/** Checks the secret and reads a batch's list (`field` of the JSON body) under the same
 * limits for every route: 401, 400 or 413 (naming both limits) refuse the whole request
 * before anything is done. Returns the list, or the refusal to answer with. */
async function readBatch(
  request: Request,
  env: Env,
  field: string,
  noun: string,
): Promise<{ items: unknown[]; doc: Record<string, unknown> } | { refused: Response }> {
  if (!env.RELAY_SECRET) {
    return { refused: fail(500, 10001, "the relay has no RELAY_SECRET; set it with wrangler secret put") };
  }
  const auth = request.headers.get("Authorization") ?? "";
  const given = auth.startsWith("Bearer ") ? auth.slice(7) : "";
  if (!(await secretMatches(given, env.RELAY_SECRET))) {
    return { refused: fail(401, 10000, "authentication error: wrong or missing relay secret") };
  }
  const maxBatch = intVar(env.MAX_BATCH, DEFAULT_MAX_BATCH, 1, 1000);
  // Every 413 says which limit and both values: a client splits a batch that is too large
  // in bytes, and stops on one that holds more items than MAX_BATCH (its own setting).
  const limits: RelayLimits = { max_batch: maxBatch, max_body_bytes: MAX_BODY_BYTES };
  const tooLarge = (message: string) => ({ refused: fail(413, 10413, message, { limits }) });
  const length = Number(request.headers.get("Content-Length") ?? "0");
  if (length > MAX_BODY_BYTES) return tooLarge(`the batch is over ${MAX_BODY_BYTES} bytes`);
  let doc: unknown;
  try {
    // Read whole, then measured: a chunked body has no Content-Length to check first.
    const bytes = await request.arrayBuffer();
    if (bytes.byteLength > MAX_BODY_BYTES) return tooLarge(`the batch is over ${MAX_BODY_BYTES} bytes`);
    doc = JSON.parse(new TextDecoder().decode(bytes));
  } catch {
    return { refused: fail(400, 10400, "the body is not JSON") };
  }
  const items = (doc as Record<string, unknown> | null)?.[field];
  if (!Array.isArray(items)) return { refused: fail(400, 10400, `expected {"${field}": [...]}`) };
  if (items.length > maxBatch) {
    return tooLarge(`a batch holds at most ${maxBatch} ${noun} (MAX_BATCH), got ${items.length}`);
  }
  return { items, doc: doc as Record<string, unknown> };
}

export async function handleEvents(request: Request, env: Env): Promise<Response> {
  const read = await readBatch(request, env, "events", "events");
  if ("refused" in read) return read.refused;
  const items = read.items;

  const results: RelayResult[] = new Array(items.length);
  const shards = intVar(env.DEDUPE_SHARDS, DEFAULT_SHARDS, 1, 1024);
  const groups = new Map<number, { index: number; event: RelayEvent }[]>();
  items.forEach((raw, index) => {
    const { event, error } = checkEvent(raw, env);
    if (error) {
      results[index] = error;
      return;
    }
    const shard = shardOf(event!.key, shards);
    let group = groups.get(shard);
    if (!group) groups.set(shard, (group = []));
    group.push({ index, event: event! });
  });
  // Fingerprints are taken here, not in the Durable Object: hashing is async, and the
  // object takes its claims synchronously (see RelayDedupe.fetch).
  await Promise.all(
    [...groups.values()].flat().map(async (g) => {
      g.event.fp = await fingerprint(g.event);
    }),
  );

  // One Durable Object call per shard that holds events of this batch; each one sends
  // its events itself, so that claiming, sending and recording a key happen in one place.
  await Promise.all(
    [...groups].map(async ([shard, group]) => {
      const stub = env.DEDUPE.get(env.DEDUPE.idFromName(`shard-${shard}`));
      let answer: RelayResult[] | null = null;
      let message = "";
      try {
        const response = await stub.fetch(
          new Request("https://dedupe/send", {
            method: "POST",
            body: JSON.stringify(group.map((g) => g.event)),
          }),
        );
        if (response.ok) answer = (await response.json()) as RelayResult[];
        else message = `dedupe shard answered HTTP ${response.status}`;
      } catch (err) {
        message = `dedupe shard failed: ${String(err)}`;
      }
      group.forEach((g, i) => {
        results[g.index] = answer?.[i] ?? {
          key: g.event.key,
          ok: false,
          code: "maybe_delivered",
          message,
        };
      });
    }),
  );
  return json(200, { success: true, errors: [], messages: [], results });
}

// --- POST /create and POST /status ------------------------------------------------------

export type CreateResult =
  | { instance_id: string; outcome: "created" }
  | { instance_id: string; outcome: "exists" | "invalid" | "failed"; code: number | null; message: string };

export type StatusResult =
  | { id: string; status: string; output?: unknown; error?: unknown }
  | { id: string; code: "not_found" | "invalid" | "failed"; message: string };

// The binding's per-instance error codes (createBatch's `errors`).
const CODE_ALREADY_EXISTS = 10405;
const CODE_DUPLICATE_IN_BATCH = 10415;
// Ids the API keeps for itself: its own routes, and the ids it makes (cf_ + 64 hex).
const RESERVED_IDS = new Set(["batch", "terminate", "terminateAll"]);
const INTERNAL_ID = /^cf_[0-9a-f]{64}$/;
const MAX_PARAMS_BYTES = 1024 * 1024;
const BINDING_MAX_BATCH = 100;

function validId(id: unknown): id is string {
  return typeof id === "string" && id.length >= 1 && id.length <= MAX_ID_LEN && ID_PATTERN.test(id);
}

function isNotFound(err: unknown): boolean {
  return /not[_ ]?found/i.test(describe(err));
}

/** Runs fn over items, at most `limit` at once, results in order. */
async function mapLimit<T, R>(items: T[], limit: number, fn: (item: T) => Promise<R>): Promise<R[]> {
  const out: R[] = new Array(items.length);
  let next = 0;
  const worker = async () => {
    while (next < items.length) {
      const i = next++;
      out[i] = await fn(items[i]);
    }
  };
  await Promise.all(Array.from({ length: Math.min(limit, items.length) }, worker));
  return out;
}

function checkInstance(raw: unknown): { options?: CreateOptions; error?: CreateResult } {
  const item = typeof raw === "object" && raw !== null && !Array.isArray(raw) ? (raw as Record<string, unknown>) : null;
  const id = item && typeof item.instance_id === "string" ? item.instance_id : "";
  const bad = (message: string) => ({ error: { instance_id: id, outcome: "invalid" as const, code: null, message } });
  if (item === null) return bad("an instance must be an object");
  if (!validId(item.instance_id)) {
    return bad(`instance_id must be 1..${MAX_ID_LEN} characters matching ${ID_PATTERN.source}`);
  }
  if (RESERVED_IDS.has(id) || INTERNAL_ID.test(id)) return bad(`instance_id ${JSON.stringify(id)} is reserved`);
  if (item.params !== undefined && encoder.encode(JSON.stringify(item.params)).length > MAX_PARAMS_BYTES) {
    return bad(`params are over ${MAX_PARAMS_BYTES} bytes`);
  }
  return { options: item.params === undefined ? { id } : { id, params: item.params } };
}

type BatchError = { index?: unknown; id?: unknown; code?: unknown; message?: unknown };

/** The instances of one batch the binding made, or failed to make, by id. */
async function createThroughBinding(
  env: Env,
  todo: CreateOptions[],
  concurrency: number,
): Promise<Map<string, CreateResult>> {
  const answers = new Map<string, CreateResult>();
  const failAll = (message: string) => {
    for (const o of todo) {
      if (!answers.has(o.id)) answers.set(o.id, { instance_id: o.id, outcome: "failed", code: null, message });
    }
  };
  let result: unknown;
  try {
    result = await env.WORKFLOW.createBatch({ instances: todo });
  } catch (err) {
    // A runtime from before {instances} (wrangler < 4.148) refuses that shape: the legacy
    // array. Ids are unique, so a second call never makes an instance twice.
    try {
      result = await env.WORKFLOW.createBatch(todo);
    } catch (legacyErr) {
      failAll(`createBatch failed: ${describe(err)}; as an array: ${describe(legacyErr)}`);
      return answers;
    }
  }
  const doc = result as { created?: unknown; errors?: unknown } | null;
  if (doc !== null && typeof doc === "object" && !Array.isArray(doc) && Array.isArray(doc.created)) {
    for (const raw of Array.isArray(doc.errors) ? (doc.errors as BatchError[]) : []) {
      const byIndex = typeof raw?.index === "number" ? todo[raw.index]?.id : undefined;
      const id = typeof raw?.id === "string" ? raw.id : byIndex;
      if (id === undefined || answers.has(id)) continue;
      const code = typeof raw.code === "number" ? raw.code : null;
      const message = String(raw.message ?? "");
      const outcome =
        code === CODE_ALREADY_EXISTS ? "exists" : code === CODE_DUPLICATE_IN_BATCH ? "invalid" : "failed";
      answers.set(id, { instance_id: id, outcome, code, message });
    }
    for (const made of doc.created as { id?: unknown }[]) {
      if (typeof made?.id === "string" && !answers.has(made.id)) {
        answers.set(made.id, { instance_id: made.id, outcome: "created" });
      }
    }
  } else if (Array.isArray(result)) {
    // The legacy answer: the instances made, nothing about the others (an id that exists
    // is skipped without a word). Each one not made is looked up: found, it was there.
    for (const made of result as { id?: unknown }[]) {
      if (typeof made?.id === "string") answers.set(made.id, { instance_id: made.id, outcome: "created" });
    }
    const rest = todo.filter((o) => !answers.has(o.id));
    await mapLimit(rest, concurrency, async (o) => {
      try {
        await env.WORKFLOW.get(o.id);
        answers.set(o.id, { instance_id: o.id, outcome: "exists", code: null, message: "not created: it exists" });
      } catch (err) {
        const message = isNotFound(err) ? "createBatch did not create it" : describe(err);
        answers.set(o.id, { instance_id: o.id, outcome: "failed", code: null, message });
      }
    });
  }
  failAll("createBatch's answer does not name this instance");
  return answers;
}

export async function handleCreate(request: Request, env: Env): Promise<Response> {
  const read = await readBatch(request, env, "instances", "instances");
  if ("refused" in read) return read.refused;
  const concurrency = intVar(env.SEND_CONCURRENCY, DEFAULT_CONCURRENCY, 1, 256);
  const results: CreateResult[] = new Array(read.items.length);
  const todo: { index: number; options: CreateOptions }[] = [];
  const seen = new Set<string>();
  read.items.forEach((raw, index) => {
    const { options, error } = checkInstance(raw);
    if (error) {
      results[index] = error;
    } else if (seen.has(options!.id)) {
      // Settled here rather than by the binding, so that the first one keeps its answer.
      results[index] = {
        instance_id: options!.id,
        outcome: "invalid",
        code: CODE_DUPLICATE_IN_BATCH,
        message: "instance_id repeats an earlier one of this batch",
      };
    } else {
      seen.add(options!.id);
      todo.push({ index, options: options! });
    }
  });
  if (todo.length > 0) {
    // The binding takes at most 100 a call: a MAX_BATCH above that makes several calls.
    for (let n = 0; n < todo.length; n += BINDING_MAX_BATCH) {
      const chunk = todo.slice(n, n + BINDING_MAX_BATCH);
      const answers = await createThroughBinding(
        env,
        chunk.map((t) => t.options),
        concurrency,
      );
      for (const t of chunk) results[t.index] = answers.get(t.options.id)!;
    }
  }
  return json(200, { success: true, errors: [], messages: [], results });
}

export async function handleStatus(request: Request, env: Env): Promise<Response> {
  const read = await readBatch(request, env, "ids", "ids");
  if ("refused" in read) return read.refused;
  const concurrency = intVar(env.SEND_CONCURRENCY, DEFAULT_CONCURRENCY, 1, 256);
  const results = await mapLimit(read.items, concurrency, async (id): Promise<StatusResult> => {
    if (!validId(id)) {
      const shown = typeof id === "string" ? id : "";
      return { id: shown, code: "invalid", message: `an id must be 1..${MAX_ID_LEN} characters matching ${ID_PATTERN.source}` };
    }
    let instance: WorkflowInstance;
    try {
      instance = await env.WORKFLOW.get(id);
    } catch (err) {
      if (isNotFound(err)) return { id, code: "not_found", message: describe(err) };
      return { id, code: "failed", message: describe(err) };
    }
    try {
      const got = await instance.status();
      const out: { id: string; status: string; output?: unknown; error?: unknown } = {
        id,
        status: String(got.status),
      };
      if (got.output !== undefined && got.output !== null) out.output = got.output;
      if (got.error !== undefined && got.error !== null) out.error = got.error;
      return out;
    } catch (err) {
      return { id, code: isNotFound(err) ? "not_found" : "failed", message: describe(err) };
    }
  });
  return json(200, { success: true, errors: [], messages: [], results });
}

const DEFAULT_WATCH_MS = 60_000;
const MAX_WATCH_MS = 15 * 60_000;
const MAX_FILTER = 32;

/** How one instance's watch ended: the subscription ended (after the instance's own end),
 * the request's timeout_ms passed, or it could not be watched. */
export type WatchEnd = {
  instanceId: string;
  end: "ended" | "timeout" | "not_found" | "invalid" | "unsupported" | "failed";
  message?: string;
};

/** Watches up to MAX_BATCH instances with one request: one subscribe() each, all at once,
 * their events written back as NDJSON lines in the order they come. The stream ends once
 * every instance's subscription has ended or timeout_ms has passed. A client that goes
 * away ends every subscription. */
export async function handleWatch(request: Request, env: Env): Promise<Response> {
  const read = await readBatch(request, env, "ids", "ids");
  if ("refused" in read) return read.refused;
  const { filter, timeout_ms } = read.doc as { filter?: unknown; timeout_ms?: unknown };
  if (
    filter !== undefined &&
    !(Array.isArray(filter) && filter.length <= MAX_FILTER && filter.every((t) => typeof t === "string"))
  ) {
    return fail(400, 10400, `filter must be a list of at most ${MAX_FILTER} event types`);
  }
  const timeoutMs = timeout_ms === undefined ? DEFAULT_WATCH_MS : Number(timeout_ms);
  if (!Number.isInteger(timeoutMs) || timeoutMs < 1 || timeoutMs > MAX_WATCH_MS) {
    return fail(400, 10400, `timeout_ms must be an integer of 1..${MAX_WATCH_MS}`);
  }
  const { readable, writable } = new TransformStream<Uint8Array, Uint8Array>();
  const writer = writable.getWriter();
  const encoder = new TextEncoder();
  let gone = false;
  let writing: Promise<void> = Promise.resolve();
  // Lines are written one after another; once the client is gone, nothing more is.
  const line = (doc: unknown): Promise<void> => {
    writing = writing.then(async () => {
      if (gone) return;
      try {
        await writer.write(encoder.encode(JSON.stringify(doc) + "\n"));
      } catch {
        gone = true;
      }
    });
    return writing;
  };
  const deadline = Date.now() + timeoutMs;
  const options = filter === undefined ? {} : { filter: filter as string[] };
  const watchOne = async (id: unknown): Promise<void> => {
    const end = (doc: Omit<WatchEnd, "instanceId">) => line({ instanceId: typeof id === "string" ? id : "", ...doc });
    if (!validId(id)) {
      await end({ end: "invalid", message: `an id must be 1..${MAX_ID_LEN} characters matching ${ID_PATTERN.source}` });
      return;
    }
    let sub: WorkflowSubscription | undefined;
    try {
      const instance = await env.WORKFLOW.get(id);
      if (typeof instance.subscribe !== "function") {
        await end({ end: "unsupported", message: "this runtime's Workflow binding has no subscribe()" });
        return;
      }
      sub = await instance.subscribe(options);
    } catch (err) {
      await end({ end: isNotFound(err) ? "not_found" : "failed", message: describe(err) });
      return;
    }
    let timer: ReturnType<typeof setTimeout> | undefined;
    try {
      while (!gone) {
        const left = deadline - Date.now();
        const next = left <= 0 ? null : await Promise.race([
          sub.next(),
          new Promise<null>((resolve) => {
            timer = setTimeout(() => resolve(null), left);
          }),
        ]);
        clearTimeout(timer);
        if (next === null) {
          await end({ end: "timeout" });
          return;
        }
        if (next.done) {
          await end({ end: "ended" });
          return;
        }
        await line(next.value);
      }
    } catch (err) {
      await end({ end: "failed", message: describe(err) });
    } finally {
      clearTimeout(timer);
      try {
        sub[Symbol.dispose]?.();
      } catch {
        // already closed
      }
    }
  };
  const work = (async () => {
    await Promise.all(read.items.map(watchOne));
    await line({ done: true, watched: read.items.length });
    await writing;
    try {
      await writer.close();
    } catch {
      // the client went away
    }
  })();
  // The stream's work outlives this handler's return: keep the request alive until it ends.
  void work;
  // The relay's clock (epoch ms) as it answers, for the client's clock-offset estimate:
  // the engine's timestamps come from the same Cloudflare clock (wrangler dev: this host's).
  return new Response(readable, {
    status: 200,
    headers: {
      "Content-Type": "application/x-ndjson",
      "Cache-Control": "no-store",
      "X-Relay-Now": String(Date.now()),
    },
  });
}

function describe(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}

/** Delivered keys of one shard, and the sending of that shard's events. */
export class RelayDedupe {
  private readonly sql: SqlStorage;

  constructor(
    private readonly state: DurableObjectState,
    private readonly env: Env,
  ) {
    this.sql = state.storage.sql;
    // state: 'claimed' while a request sends it, 'delivered' once the binding said yes;
    // fp: the fingerprint of the event sent under the key.
    this.sql.exec(
      "CREATE TABLE IF NOT EXISTS keys (key TEXT PRIMARY KEY, state TEXT NOT NULL, at INTEGER NOT NULL, fp TEXT)",
    );
    // A table made by a relay from before fingerprints has no fp column: add it. Its rows
    // keep fp NULL, and a delivered one answers unverifiable (see fetch), never ok.
    try {
      this.sql.exec("ALTER TABLE keys ADD COLUMN fp TEXT");
    } catch (err) {
      if (!/duplicate column/i.test(describe(err))) throw err;
    }
  }

  async fetch(request: Request): Promise<Response> {
    const events = (await request.json()) as RelayEvent[];
    const now = Date.now();
    const results: RelayResult[] = new Array(events.length);
    const todo: number[] = [];
    // Claims are taken synchronously, before the first await: no other request can run
    // in this object in between, so two batches never both send one key.
    const refuse = (i: number, code: string, message: string) => {
      results[i] = { key: events[i].key, ok: false, code, message };
    };
    events.forEach((event, i) => {
      const row = this.sql.exec("SELECT state, at, fp FROM keys WHERE key = ?", event.key).toArray()[0];
      const state = row?.state;
      const live = state === "delivered" || (state === "claimed" && now - Number(row?.at) < CLAIM_EXPIRY_MS);
      const fp = row?.fp ?? null;
      const earlier = todo.find((j) => events[j].key === event.key);
      if (live && fp === null) {
        // Sent by a relay that kept no fingerprint: an ok would be a guess, and a new send
        // a possible duplicate. In flight, it is still only in flight.
        if (state === "delivered") refuse(i, "unverifiable", UNVERIFIABLE);
        else refuse(i, "in_flight", "another request is sending this key now");
      } else if (live && fp !== event.fp) {
        refuse(i, "key_reused", KEY_REUSED);
      } else if (state === "delivered") {
        results[i] = { key: event.key, ok: true, deduped: true };
      } else if (live) {
        refuse(i, "in_flight", "another request is sending this key now");
      } else if (earlier !== undefined) {
        if (events[earlier].fp !== event.fp) refuse(i, "key_reused", KEY_REUSED);
        else refuse(i, "invalid", "key repeated in the batch");
      } else {
        this.sql.exec(
          "INSERT OR REPLACE INTO keys (key, state, at, fp) VALUES (?, 'claimed', ?, ?)",
          event.key,
          now,
          event.fp,
        );
        todo.push(i);
      }
    });

    const concurrency = intVar(this.env.SEND_CONCURRENCY, DEFAULT_CONCURRENCY, 1, 256);
    let next = 0;
    const worker = async () => {
      while (next < todo.length) {
        const i = todo[next++];
        results[i] = await this.sendOne(events[i]);
      }
    };
    await Promise.all(Array.from({ length: Math.min(concurrency, todo.length) }, worker));
    await this.scheduleCleanup();
    return new Response(JSON.stringify(results), { headers: { "Content-Type": "application/json" } });
  }

  private async sendOne(event: RelayEvent): Promise<RelayResult> {
    let instance: WorkflowInstance;
    try {
      instance = await this.env.WORKFLOW.get(event.instance_id);
    } catch (err) {
      this.sql.exec("DELETE FROM keys WHERE key = ?", event.key);
      const message = describe(err);
      const code = /not[_ ]?found/i.test(message) ? "not_found" : "failed";
      return { key: event.key, ok: false, code, message };
    }
    try {
      await instance.sendEvent(
        event.payload === undefined ? { type: event.type } : { type: event.type, payload: event.payload },
      );
    } catch (err) {
      // The claim is dropped either way: the dedupe promises only that a delivered event
      // is not sent twice, and the sender is told this one may have been.
      this.sql.exec("DELETE FROM keys WHERE key = ?", event.key);
      const message = describe(err);
      if (/not[_ ]?found/i.test(message)) return { key: event.key, ok: false, code: "not_found", message };
      return { key: event.key, ok: false, code: "maybe_delivered", message };
    }
    this.sql.exec("UPDATE keys SET state = 'delivered', at = ? WHERE key = ?", Date.now(), event.key);
    return { key: event.key, ok: true, deduped: false };
  }

  private async scheduleCleanup(): Promise<void> {
    if ((await this.state.storage.getAlarm()) === null) {
      const ttl = intVar(this.env.DEDUPE_TTL_SECONDS, DEFAULT_TTL_SECONDS, 60, 365 * 24 * 3600);
      await this.state.storage.setAlarm(Date.now() + Math.min(ttl * 1000, 24 * 3600 * 1000));
    }
  }

  async alarm(): Promise<void> {
    const ttl = intVar(this.env.DEDUPE_TTL_SECONDS, DEFAULT_TTL_SECONDS, 60, 365 * 24 * 3600);
    this.sql.exec("DELETE FROM keys WHERE state = 'delivered' AND at < ?", Date.now() - ttl * 1000);
    this.sql.exec("DELETE FROM keys WHERE state = 'claimed' AND at < ?", Date.now() - CLAIM_EXPIRY_MS);
    const left = this.sql.exec("SELECT COUNT(*) AS n FROM keys").toArray()[0];
    if (Number(left?.n ?? 0) > 0) {
      await this.state.storage.setAlarm(Date.now() + Math.min(ttl * 1000, 24 * 3600 * 1000));
    }
  }
}

export default {
  async fetch(request: Request, env: Env): Promise<Response> {
    const url = new URL(request.url);
    const routes: Record<string, (request: Request, env: Env) => Promise<Response>> = {
      "/events": handleEvents,
      "/create": handleCreate,
      "/status": handleStatus,
      "/watch": handleWatch,
    };
    const route = Object.hasOwn(routes, url.pathname) ? routes[url.pathname] : undefined;
    if (route !== undefined) {
      if (request.method !== "POST") return fail(405, 10405, `use POST ${url.pathname}`);
      return route(request, env);
    }
    return fail(404, 10404, "not found; the relay answers POST /events, /create, /status and /watch");
  },
};
