/**
 * The test project: a Workflow whose instances wait for one event and finish with its
 * payload. The relay (relay/, its own Worker and config) binds to it by script_name; the
 * tests create instances and read their status through wrangler dev's local REST API
 * (/cdn-cgi/local/explorer/api). Runs only under `wrangler dev` (tests/test_wrangler.py).
 * Every instance's first step is `waitForEvent("wait for go", {type: "go"})`: the known
 * type that tests of consumption (an instance's steps, then its output) look for.
 * With `{then_ms: N}` in its params, an instance runs one more step after "go",
 * `step.do("after go")`, that takes N ms, then completes: a reaction of a known length
 * (tests/test_wrangler_reaction.py). Without it nothing changes.
 */
import { WorkflowEntrypoint } from "cloudflare:workers";

type Step = {
  waitForEvent<T>(name: string, options: { type: string; timeout?: string }): Promise<{ payload: T; type: string }>;
  do<T>(name: string, callback: () => Promise<T>): Promise<T>;
};

type Params = { probe?: boolean; then_ms?: number };

export class MyWorkflow extends WorkflowEntrypoint<unknown, Params> {
  async run(event: { payload: Params }, step: Step): Promise<unknown> {
    const got = await step.waitForEvent<unknown>("wait for go", { type: "go", timeout: "1 hour" });
    const thenMs = event.payload?.then_ms;
    if (typeof thenMs === "number" && thenMs >= 0) {
      const waited = await step.do("after go", async () => {
        await new Promise((resolve) => setTimeout(resolve, thenMs));
        return thenMs;
      });
      return { payload: got.payload, after_go_ms: waited };
    }
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

export default {
  async fetch(): Promise<Response> {
    // Only bindings reach this Worker in the tests: the relay is the one on the port.
    return new Response("this Worker holds the Workflow; send through the relay or the local API", { status: 404 });
  },
};
