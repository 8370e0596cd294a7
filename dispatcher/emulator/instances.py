"""Workflow instances in the emulator (opt-in): create, batch create, list, get, events.

Each instance runs one configurable model workflow, computed from its creation time and
the events it received, so nothing runs in the background: a read derives the state at
that moment from the clock. The model: after ``wait_after`` seconds the instance enters
``step.waitForEvent(event_type, timeout)``; an event of that type that arrived earlier is
kept and consumed as the wait starts (as the platform buffers it). Then one ``step.do``
per entry of ``steps`` (seconds each), then ``complete``; an instance created with
params ``{"wait_for": T}`` waits for ``T`` instead of the model's type, one with
``{"timeout": S}`` times out after ``S`` seconds instead of the model's timeout. An
``error_share`` of the instances (chosen from the id and the seed, so reproducible)
errors in its last step. A wait that times out errors the instance.

Reaction (issue 26): the wait consumes its event ``reaction`` after it could (a delay
drawn per instance from a :class:`~dispatcher.emulator.reaction.Spread`), so the
``waitForEvent`` step ends at max(event accepted, wait started) + that delay; each step
lasts its duration ± ``step_jitter`` (uniform, cut at 0); a ``never_consume`` share of the
instances never consumes its event (its wait times out). All drawn from the id and the
seed, so every read of an instance sees the same times. With ``capacity`` (events/s) the
workflow takes its events one by one from a queue shared by every instance, each after
the one before by 1 / capacity: an arrival rate past it makes the reaction climb (the
knee a ramp of ``load --observe`` shows).
"""

from __future__ import annotations

import base64
import math
import time
from dataclasses import dataclass
from hashlib import sha256
from typing import Any, Final

import orjson

from dispatcher.emulator import envelope
from dispatcher.emulator.envelope import ApiError
from dispatcher.emulator.reaction import Spread, unit_draw
from dispatcher.inputs.validation import RuleViolation, check_path

MAX_BATCH: Final = 100
MAX_PER_PAGE: Final = 100
DEFAULT_PER_PAGE: Final = 50
STATUSES: Final = frozenset(
    {"queued", "running", "paused", "errored", "terminated", "complete", "waitingForPause",
     "waiting"}
)  # fmt: skip

# 10405/10415 are the binding's createBatch codes (changelog 2026-10-08); REST's are not
# published, so the emulator uses the same numbers.
ALREADY_EXISTS: Final = 10405
DUPLICATE_IN_BATCH: Final = 10415
BAD_REQUEST_CODE: Final = 10023  # chosen: Cloudflare publishes none for a bad body here
# Chosen, not checked against the real API: listing a workflow the emulator holds no
# instance of answers 404 with this code (a workflow "exists" once it has an instance).
WORKFLOW_NOT_FOUND: Final = 10200


@dataclass(frozen=True, slots=True, kw_only=True)
class InstanceModel:
    """The model workflow every emulated instance runs (see the module docstring)."""

    event_type: str = "approval"
    timeout: float = 3600.0
    wait_after: float = 0.0
    steps: tuple[float, ...] = ()
    error_share: float = 0.0
    reaction: Spread | None = None  # None: the wait ends the moment its event is there
    step_jitter: float = 0.0  # each step lasts its duration ± this (uniform), in seconds
    never_consume: float = 0.0  # share of instances whose wait never takes its event
    capacity: float | None = None  # events consumed per second at most, over all instances

    def __post_init__(self) -> None:
        if not isinstance(self.event_type, str) or not 1 <= len(self.event_type) <= 100:
            raise ValueError("instances event_type must be 1..100 characters")
        for name in ("timeout", "wait_after"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not 0 <= value < math.inf:
                raise ValueError(f"instances {name} must be seconds >= 0, got {value!r}")
        if not isinstance(self.steps, tuple) or not all(
            isinstance(s, int | float) and 0 <= s < math.inf for s in self.steps
        ):
            raise ValueError("instances steps must be a tuple of durations >= 0")
        if not isinstance(self.error_share, int | float) or not 0 <= self.error_share <= 1:
            raise ValueError(f"instances error_share must be 0..1, got {self.error_share!r}")
        if self.reaction is not None and not isinstance(self.reaction, Spread):
            raise ValueError(f"instances reaction must be a Spread or None, got {self.reaction!r}")
        if not isinstance(self.step_jitter, int | float) or not 0 <= self.step_jitter < math.inf:
            raise ValueError(f"instances step_jitter must be seconds >= 0: {self.step_jitter!r}")
        if self.capacity is not None and (
            not isinstance(self.capacity, int | float) or not 0 < self.capacity < math.inf
        ):
            raise ValueError(f"instances capacity must be events/s > 0, got {self.capacity!r}")
        if not isinstance(self.never_consume, int | float) or not 0 <= self.never_consume <= 1:
            raise ValueError(f"instances never_consume must be 0..1, got {self.never_consume!r}")


class Instance:
    __slots__ = ("created", "events", "id", "params", "queued", "seq")

    def __init__(self, instance_id: str, params: Any, created: float, seq: int) -> None:
        self.id = instance_id
        self.params = params
        self.created = created
        self.seq = seq
        self.events: dict[str, list[float]] = {}
        self.queued: float | None = None  # with a capacity: when its turn in the queue came


class Answer:
    """A status and an encoded envelope."""

    __slots__ = ("body", "code", "status")

    def __init__(self, status: int, body: bytes, code: int | None = None) -> None:
        self.status = status
        self.body = body
        self.code = code

    @classmethod
    def ok(cls, result: Any, result_info: dict[str, Any] | None = None) -> Answer:
        doc: dict[str, Any] = {"success": True, "errors": [], "messages": [], "result": result}
        if result_info is not None:
            doc["result_info"] = result_info
        return cls(200, orjson.dumps(doc))

    @classmethod
    def error(cls, err: ApiError) -> Answer:
        return cls(err.status, err.body, err.code)


def _bad(message: str) -> Answer:
    return Answer.error(envelope.api_error(400, BAD_REQUEST_CODE, message))


class InstanceStore:
    """Every instance of every workflow the emulator was asked to create."""

    def __init__(
        self,
        model: InstanceModel,
        seed: int,
        clock: Any,
        creations: dict[tuple[str, str], int],
        *,
        strict_ids: bool,
    ) -> None:
        self.model = model
        self._seed = seed
        self._clock = clock
        self._strict = strict_ids
        self._wall_offset = time.time() - clock()
        self._by_workflow: dict[str, dict[str, Instance]] = {}
        self._seq = 0
        self._free_at = -math.inf  # with a capacity: when the queue takes its next event
        self.creations = creations  # (workflow, id) -> times created: the log's

    # -- time and state -----------------------------------------------------------------

    def _iso(self, t: float | None) -> str | None:
        if t is None:
            return None
        wall = t + self._wall_offset
        ms = int((wall - int(wall)) * 1000)
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(wall)) + f".{ms:03d}Z"

    def _errors(self, inst: Instance) -> bool:
        if self.model.error_share <= 0:
            return False
        digest = sha256(f"{self._seed}:{inst.id}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64 < self.model.error_share

    def _state(self, inst: Instance, now: float) -> dict[str, Any]:
        """Status, error, output, steps and end time of ``inst`` at ``now``."""
        m = self.model
        steps: list[dict[str, Any]] = []
        wait_start = inst.created + m.wait_after
        timeout = m.timeout
        # params {"timeout": S} gives one instance its own wait timeout (the demo's
        # instances whose payment window has passed).
        own = inst.params.get("timeout") if isinstance(inst.params, dict) else None
        if isinstance(own, int | float) and not isinstance(own, bool) and 0 <= own < math.inf:
            timeout = float(own)
        deadline = wait_start + timeout
        if now < wait_start:
            return {"status": "running", "steps": steps, "end": None, "error": None,
                    "output": None}  # fmt: skip
        # An instance created with params {"wait_for": T} waits for T instead (so that one
        # workflow holds instances waiting for different events, as tests need).
        wait_type = self._wait_type(inst)
        arrivals = inst.events.get(wait_type, [])
        if inst.queued is not None:
            arrivals = [inst.queued]
        if self._never(inst):
            arrivals = []
        got = min(arrivals) if arrivals else None
        wait_end = None if got is None else max(got, wait_start)
        if wait_end is not None and m.reaction is not None:
            wait_end += m.reaction.draw(unit_draw(self._seed, inst.id, "reaction"))
        if wait_end is not None and wait_end > deadline:
            wait_end = None
        step: dict[str, Any] = {
            "type": "waitForEvent", "name": wait_type, "event_type": wait_type,
            "start": self._iso(wait_start), "end": None, "finished": False, "output": None,
            "error": None,
        }  # fmt: skip
        steps.append(step)
        if wait_end is None or wait_end > now:
            if now >= deadline:
                step["end"] = self._iso(deadline)
                step["finished"] = True
                error = {"name": "WorkflowTimeoutError",
                         "message": f"waitForEvent {wait_type!r} timed out"}  # fmt: skip
                step["error"] = error  # as the API's step has it: a wait that got nothing
                return {"status": "errored", "steps": steps, "end": self._iso(deadline),
                        "error": error, "output": None}  # fmt: skip
            return {"status": "running", "steps": steps, "end": None, "error": None,
                    "output": None}  # fmt: skip
        step["end"] = self._iso(wait_end)
        step["finished"] = True
        # As wrangler dev's step output has it: the event, with the time it was accepted.
        sent_at = min(inst.events.get(wait_type) or [wait_end])
        step["output"] = {"type": wait_type, "timestamp": self._iso(sent_at)}
        t = wait_end
        fails = self._errors(inst)
        for i, planned in enumerate(m.steps):
            duration = planned
            if m.step_jitter > 0:
                u = unit_draw(self._seed, inst.id, f"step-{i}")
                duration = max(0.0, planned + (2 * u - 1) * m.step_jitter)
            last = i == len(m.steps) - 1
            do: dict[str, Any] = {"type": "step", "name": f"step-{i + 1}",
                                  "start": self._iso(t), "end": None, "success": None,
                                  "output": None}  # fmt: skip
            steps.append(do)
            if now < t + duration:
                return {"status": "running", "steps": steps, "end": None, "error": None,
                        "output": None}  # fmt: skip
            t += duration
            do["end"] = self._iso(t)
            do["success"] = not (fails and last)
            if fails and last:
                error = {"name": "Error", "message": f"step-{i + 1} failed (modelled error)"}
                return {"status": "errored", "steps": steps, "end": self._iso(t),
                        "error": error, "output": None}  # fmt: skip
        if fails and not m.steps:
            error = {"name": "Error", "message": "modelled error"}
            return {"status": "errored", "steps": steps, "end": self._iso(t), "error": error,
                    "output": None}  # fmt: skip
        return {"status": "complete", "steps": steps, "end": self._iso(t), "error": None,
                "output": "done"}  # fmt: skip

    def _summary(self, workflow: str, inst: Instance, state: dict[str, Any]) -> dict[str, Any]:
        created = self._iso(inst.created)
        return {
            "id": inst.id,
            "status": state["status"],
            "created_on": created,
            "modified_on": created if state["end"] is None else state["end"],
            "started_on": created,
            "ended_on": state["end"],
            "workflow_id": workflow,
            "version_id": "emulator",
        }

    # -- operations ---------------------------------------------------------------------

    def instance(self, workflow: str, instance_id: str) -> Instance | None:
        return self._by_workflow.get(workflow, {}).get(instance_id)

    def _never(self, inst: Instance) -> bool:
        share = self.model.never_consume
        return share > 0 and unit_draw(self._seed, inst.id, "never") < share

    def _wait_type(self, inst: Instance) -> str:
        if isinstance(inst.params, dict) and isinstance(inst.params.get("wait_for"), str):
            return str(inst.params["wait_for"])
        return self.model.event_type

    def receive_event(self, workflow: str, instance_id: str, event_type: str, t: float) -> bool:
        """Keep an event for an instance; False when there is no such instance."""
        inst = self.instance(workflow, instance_id)
        if inst is None:
            return False
        inst.events.setdefault(event_type, []).append(t)
        capacity = self.model.capacity
        if (
            capacity is not None
            and inst.queued is None
            and event_type == self._wait_type(inst)
            and not self._never(inst)
        ):
            # Its turn in the one queue: when it could be taken, or after the one before.
            turn = max(t, inst.created + self.model.wait_after, self._free_at)
            self._free_at = turn + 1 / capacity
            inst.queued = turn
        return True

    def _check_items(self, body: Any, *, single: bool) -> list[tuple[str | None, Any]] | Answer:
        items = [body] if single else body
        if single and body is None:
            items = [{}]
        if not isinstance(items, list):
            return _bad("the body must be a JSON array of {instance_id?, params?}")
        if not single and not 1 <= len(items) <= MAX_BATCH:
            return _bad(f"a batch holds 1..{MAX_BATCH} instances, got {len(items)}")
        out: list[tuple[str | None, Any]] = []
        for n, item in enumerate(items):
            where = "" if single else f"item {n}: "
            if not isinstance(item, dict):
                return _bad(f"{where}each instance must be an object")
            iid = item.get("instance_id", item.get("id"))
            if iid is not None:
                try:
                    check_path(workflow="w", instance_id=iid, event_type="e",
                               strict_ids=self._strict)  # fmt: skip
                except RuleViolation as exc:
                    return _bad(f"{where}{exc.message}")
            out.append((iid, item.get("params")))
        return out

    def create(self, workflow: str, body: Any, *, single: bool) -> Answer:
        """One instance (``single``) or a batch; a batch that names an existing id or the
        same id twice creates none of its instances (the emulator's choice)."""
        checked = self._check_items(body, single=single)
        if isinstance(checked, Answer):
            return checked
        existing = self._by_workflow.setdefault(workflow, {})
        seen: set[str] = set()
        for iid, _ in checked:
            if iid is None:
                continue
            if iid in existing:
                msg = f"instance.already_exists: {iid!r} already exists"
                return Answer.error(envelope.api_error(409, ALREADY_EXISTS, msg))
            if iid in seen:
                msg = f"instance.duplicate_in_batch: {iid!r} is named twice"
                return Answer.error(envelope.api_error(400, DUPLICATE_IN_BATCH, msg))
            seen.add(iid)
        now = self._clock()
        results = []
        for iid, params in checked:
            self._seq += 1
            real_id = iid if iid is not None else sha256(f"{self._seq}".encode()).hexdigest()[:32]
            inst = Instance(real_id, params, now, self._seq)
            existing[real_id] = inst
            key = (workflow, real_id)
            self.creations[key] = self.creations.get(key, 0) + 1
            results.append(self._summary(workflow, inst, self._state(inst, now)))
        if single:
            one = results[0]
            return Answer.ok({"id": one["id"], "status": one["status"],
                              "version_id": "emulator", "workflow_id": workflow})  # fmt: skip
        return Answer.ok(
            [{"id": r["id"], "status": r["status"], "version_id": "emulator",
              "workflow_id": workflow} for r in results]
        )  # fmt: skip

    def list(self, workflow: str, query: dict[str, str]) -> Answer:
        status = query.get("status")
        if status is not None and status not in STATUSES:
            return _bad(f"status must be one of {', '.join(sorted(STATUSES))}")
        per_text = query.get("per_page", str(DEFAULT_PER_PAGE))
        if not per_text.isdigit() or not 1 <= int(per_text) <= MAX_PER_PAGE:
            return _bad(f"per_page must be 1..{MAX_PER_PAGE}")
        per_page = int(per_text)
        start = 0
        cursor = query.get("cursor")
        if cursor:
            try:
                start = int(base64.urlsafe_b64decode(cursor.encode()).decode())
            except ValueError:
                return _bad("cursor is not one this API gave out")
        direction = query.get("direction", "desc")
        if direction not in {"asc", "desc"}:
            return _bad("direction must be asc or desc")
        if workflow not in self._by_workflow:
            msg = f"workflow.not_found: no workflow {workflow!r}"
            return Answer.error(envelope.api_error(404, WORKFLOW_NOT_FOUND, msg))
        now = self._clock()
        rows = list(self._by_workflow[workflow].values())
        if direction == "desc":
            rows.reverse()
        page: list[dict[str, Any]] = []
        i = start
        while i < len(rows) and len(page) < per_page:
            inst = rows[i]
            i += 1
            summary = self._summary(workflow, inst, self._state(inst, now))
            if status is None or summary["status"] == status:
                page.append(summary)
        info: dict[str, Any] = {"count": len(page), "per_page": per_page}
        if i < len(rows):
            info["cursor"] = base64.urlsafe_b64encode(str(i).encode()).decode()
        return Answer.ok(page, info)

    def get(self, workflow: str, instance_id: str, query: dict[str, str]) -> Answer:
        inst = self.instance(workflow, instance_id)
        if inst is None:
            return Answer.error(envelope.INSTANCE_NOT_FOUND)
        state = self._state(inst, self._clock())
        created = self._iso(inst.created)
        result: dict[str, Any] = {
            "status": state["status"],
            "error": state["error"],
            "output": state["output"],
            "params": inst.params,
            "queued": created,
            "start": created,
            "end": state["end"],
            "success": None if state["end"] is None else state["status"] == "complete",
            "trigger": {"source": "api"},
            "versionId": "emulator",
        }
        if query.get("simple") != "true":
            result["steps"] = state["steps"]
        return Answer.ok(result)
