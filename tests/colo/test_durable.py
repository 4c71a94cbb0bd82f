"""The gateway's durable state (colo.durable): written whole or not at all, read back with errors naming the file,
and a gateway refuses to start on a state it cannot read rather than forget what it says."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from colo import durable
from colo.auth import generate_key
from colo.errors import ColoError
from colo.gateway import Gateway, GatewayConfig
from colo.witness import DURABLE_FORMAT


def test_a_saved_state_reads_back_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    path = tmp_path / "gateway-state.json"
    assert durable.load(path) is None  # a first start
    state = {"format": DURABLE_FORMAT, "void": {"a1b2": 3}}
    durable.save(path, state)
    durable.save(path, {**state, "void": {"a1b2": 4}})  # replaced whole
    assert durable.load(path) == {"format": DURABLE_FORMAT, "void": {"a1b2": 4}}
    assert sorted(os.listdir(tmp_path)) == ["gateway-state.json"]
    assert (path.stat().st_mode & 0o777) == 0o600


@pytest.mark.parametrize("text, why", [("{not json", "not valid JSON"), ("[1, 2]", "not a JSON object")])
def test_an_unreadable_state_is_an_error_that_names_the_file(tmp_path: Path, text: str, why: str) -> None:
    path = tmp_path / "gateway-state.json"
    path.write_text(text)
    with pytest.raises(ColoError, match=why) as e:
        durable.load(path)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("text", ["{not json", '{"format": "colo-witness/1", "void": {"a": "x"}}',
                                  '{"format": "something else"}'])
def test_a_gateway_refuses_to_start_on_a_state_it_cannot_use(tmp_path: Path, text: str) -> None:
    path = tmp_path / "gateway-state.json"
    path.write_text(text)
    with pytest.raises(ColoError, match="gateway state"):
        Gateway(GatewayConfig(generate_key(), state_file=str(path)))


def test_a_gateway_starts_with_the_voids_an_earlier_one_saved(tmp_path: Path) -> None:
    path = tmp_path / "gateway-state.json"
    durable.save(path, {"format": DURABLE_FORMAT, "void": {"a1b2": 2}})
    gw = Gateway(GatewayConfig(generate_key(), state_file=str(path)))
    try:
        assert gw.witness.voids == {"a1b2": 2}
        assert gw.witness.status()["gateway"]["voided"] == {"a1b2": 2}
    finally:
        gw._close()
