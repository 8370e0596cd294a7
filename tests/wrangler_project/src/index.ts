/**
 * The test project: a Workflow whose instances wait for one event and finish with its
 * payload, the relay bound to it, and two routes the tests use to create instances and
 * read their status. Runs only under `wrangler dev` (tests/test_wrangler.py).
 */
import { WorkflowEntrypoint } from "cloudflare:workers";
import relay, { RelayDedupe, type Env as RelayEnv } from "../../../relay/src/index";

export { RelayDedupe };

type Env = RelayEnv & {
  WORKFLOW: RelayEnv["WORKFLOW"] & {
    create(options: { id: string; params?: Params }): Promise<{ id: string }>;
    get(id: string): Promise<{ sendEvent: (e: { type: string; payload?: unknown }) => Promise<void>; status(): Promise<{ status: string; output?: unknown; error?: unknown }> }>;
  };
};

type Step = {
  waitForEvent<T>(name: string, options: { type: string; timeout?: string }): Promise<{ payload: T; type: string }>;
};

type Params = { probe?: boolean };

export class WaitWorkflow extends WorkflowEntrypoint<Env, Params> {
  async run(event: { payload: Params }, step: Step): Promise<unknown> {
    const got = await step.waitForEvent<unknown>("wait for go", { type: "go", timeout: "1 hour" });
    if (!event.payload?.probe) return { payload: got.payload };
    // A probe looks for a second "go": events sent before a wait are queued for it, so
    // any copy sent before "check" is picked up here at once.
    await step.waitForEvent<unknown>("wait for check", { type: "check", timeout: "1 hour" });
    let duplicate: unknown = null;
    try {
      duplicate = (await step.waitForEvent<unknown>("second go", { type: "go", timeout: "2 seconds" })).payload;
    } catch {
      duplicate = null;
    }
    return { payload: got.payload, duplicate };
  }
}

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

export default {
  async fetch(request: Request, env: Env): Promise<Response> {
    const url = new URL(request.url);
    if (url.pathname === "/test/create" && request.method === "POST") {
      const { ids, params } = (await request.json()) as { ids: string[]; params?: Params };
      await mapLimit(ids, 16, (id) => env.WORKFLOW.create({ id, params: params ?? {} }));
      return Response.json({ created: ids.length });
    }
    if (url.pathname === "/test/status" && request.method === "POST") {
      const { ids } = (await request.json()) as { ids: string[] };
      const statuses = await mapLimit(ids, 16, async (id) => {
        try {
          return await (await env.WORKFLOW.get(id)).status();
        } catch (err) {
          return { status: "missing", error: String(err) };
        }
      });
      return Response.json(Object.fromEntries(ids.map((id, i) => [id, statuses[i]])));
    }
    return relay.fetch(request, env);
  },
};
