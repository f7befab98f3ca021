"""Scripts of the scripted peer: validated whole before anything is sent, one clear error each."""

from __future__ import annotations

import pytest

from conformance.errors import InputError
from conformance.inject.peer import Peer
from conformance.inject.script import OPS, validate


def test_a_good_script_passes_unchanged():
    steps = [{"op": "syn", "options": [{"MPCapable": {"version": 1, "flags": 0x81}}], "wait": 1},
             {"op": "ack", "options": [{"MPCapable": {"sender_key": "$client_key",
                                                      "receiver_key": "$server_key"}}]},
             {"op": "data", "size": 100, "mapping": "auto"}, {"op": "resend"}, {"op": "data_fin"},
             {"op": "fin"}, {"op": "recv", "until": "data:100", "timeout": 2}, {"op": "sleep", "seconds": 0.1},
             {"op": "rst", "options": [{"MPTCPRst": {"reason": 1}}]}]
    assert validate(steps) == steps


@pytest.mark.parametrize("steps, words", [
    ([], "non-empty list"),
    ("syn", "non-empty list"),
    ([{"options": []}], "step 1: expected a mapping with an 'op'"),
    ([{"op": "connect"}], "step 1: unknown op 'connect'"),
    ([{"op": "syn", "mss": 1400, "colour": 1}], "step 1 (syn): unknown field(s) colour"),
    ([{"op": "syn", "options": [{"MPCapable": {"version": 1}, "DSS": {}}]}], "option 1: expected"),
    ([{"op": "syn", "options": [{"MPCapabel": {}}]}], "unknown option class 'MPCapabel'"),
    ([{"op": "syn", "options": [{"MPCapable": {"keyy": 1}}]}], "(MPCapable): unknown field(s) ['keyy']"),
    ([{"op": "ack", "options": [{"MPCapable": {"sender_key": "$my_key"}}]}], "unknown variable $my_key"),
    ([{"op": "syn"}, {"op": "data", "size": 0}], "step 2 (data): size must be a positive"),
    ([{"op": "data", "size": 10, "mapping": "dss"}], "mapping must be 'auto', 'mpc' or 'infinite'"),
    ([{"op": "data", "size": 10, "checksum": "wrong"}], "checksum must be 'auto', 'always', 'never' or 'bad'"),
    ([{"op": "data", "size": 10, "skip": -5}], "skip must be a number of bytes, 0 or more"),
    ([{"op": "recv", "until": "data:many"}], "until must be one of"),
    ([{"op": "recv", "timeout": 600}], "timeout must be a number of seconds between 0 and 60"),
    ([{"op": "sleep", "seconds": True}], "seconds must be a number"),
])
def test_bad_scripts_are_one_error_naming_the_step(steps, words):
    with pytest.raises(InputError) as err:
        validate(steps, "probe.json")
    message = str(err.value)
    assert message.startswith("probe.json") and words in message and "\n" not in message


def test_every_op_is_a_method_of_the_peer():
    assert all(op == "sleep" or callable(getattr(Peer, op, None)) for op in OPS)
