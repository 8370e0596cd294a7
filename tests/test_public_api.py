"""The public API is exactly what `dispatcher.__all__` lists, and the README's example runs."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

import dispatcher
from dispatcher.emulator import Emulator, EmulatorConfig


def test_all_is_exactly_the_public_names() -> None:
    public = {name for name in vars(dispatcher) if not name.startswith("_")}
    modules = {name for name in public if type(getattr(dispatcher, name)).__name__ == "module"}
    assert sorted(public - modules - {"annotations"}) == sorted(dispatcher.__all__)
    for name in dispatcher.__all__:
        assert getattr(dispatcher, name) is not None


async def test_readme_python_api(tmp_path: Path) -> None:
    src = tmp_path / "events.jsonl"
    src.write_bytes(orjson.dumps({"instance_id": "order-1", "event_type": "approval"}) + b"\n")
    async with Emulator(EmulatorConfig(tokens=("tok-public-api",), limit=None)) as emu:
        settings = dispatcher.SendSettings(
            inputs=(str(src),),
            workflow="order-pipeline",
            account_id="acc",
            base_url=emu.base_url,
            credentials=dispatcher.Credentials(token="tok-public-api"),
            rate=dispatcher.parse_rate("50/s"),
            results=str(tmp_path / "results.jsonl"),
        )
        stats = await dispatcher.run(settings)
        assert (stats.confirmed, stats.failed) == (1, 0)
        keys = dispatcher.KeyDeriver()
        records = [
            dispatcher.event_from_mapping(
                {
                    "workflow": "order-pipeline",
                    "instance_id": f"order-{i}",
                    "event_type": "approval",
                    "body": {"ok": True},
                    "id": f"k{i}",
                },
                keys,
            )
            for i in range(20)
        ]
        async with dispatcher.dispatch(records, settings) as envelopes:
            got = [env async for env in envelopes]
    assert envelopes.abandoned == []
    assert sorted(e.key for e in got) == sorted(f"k{i}" for i in range(20))
    assert {e.delivery for e in got} == {dispatcher.Delivery.CONFIRMED}


async def test_run_twice_keeps_the_results_rule(tmp_path: Path) -> None:
    src = tmp_path / "events.jsonl"
    src.write_bytes(orjson.dumps({"instance_id": "order-1", "event_type": "approval"}) + b"\n")
    results = tmp_path / "results.jsonl"
    async with Emulator(EmulatorConfig(tokens=("tok-public-api",), limit=None)) as emu:

        def settings(*, resume: bool = False, overwrite: bool = False) -> dispatcher.SendSettings:
            return dispatcher.SendSettings(
                inputs=(str(src),),
                workflow="order-pipeline",
                account_id="acc",
                base_url=emu.base_url,
                credentials=dispatcher.Credentials(token="tok-public-api"),
                rate="unlimited",
                results=str(results),
                resume=resume,
                overwrite=overwrite,
            )

        await dispatcher.run(settings())
        with pytest.raises(dispatcher.UserError, match="already holds results"):
            await dispatcher.run(settings())
        assert len(results.read_bytes().splitlines()) == 1  # untouched
        resumed = await dispatcher.run(settings(resume=True))
        assert resumed.skipped["confirmed"] == 1
        await dispatcher.run(settings(overwrite=True))
        sent = sum(len(v) for v in emu.log.accepted.values())
    assert len(results.read_bytes().splitlines()) == 1
    assert sent == 2  # the first run and the overwrite; the refused one and resume sent nothing
