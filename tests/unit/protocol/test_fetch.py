"""The fetch protocol's two ends, wired back to back in memory (sans-I/O)."""

from __future__ import annotations

from hypothesis import given, settings, strategies as st

from p2pbackup.protocol import fetch
from p2pbackup.protocol.framing import encode


def pump(client: fetch.FetchClient, server: fetch.FetchServer, answer=None):
    """Move bytes both ways until quiet; `answer(request)` replies on the server's behalf."""
    replies, requests = [], []
    while True:
        moved = False
        out = client.data_to_send()
        if out:
            moved = True
            for ev in server.receive_data(out):
                if isinstance(ev, fetch.Request):
                    requests.append(ev)
                    if answer:
                        answer(ev)
        back = server.data_to_send()
        if back:
            moved = True
            replies += client.receive_data(back)
        if not moved:
            return replies, requests


def test_requests_and_answers_round_trip():
    c, s = fetch.FetchClient("client"), fetch.FetchServer("server")
    big = bytes(range(256)) * 9000                   # more than one part
    store = {"packs/" + "a" * 64: big}

    def answer(req):
        if req.op == "get":
            s.reply(req.id, store[req.name]) if req.name in store else \
                s.fail(req.id, fetch.NOT_FOUND, req.name)
        elif req.op == "list":
            s.reply(req.id, sorted(store))
        elif req.op == "size":
            s.reply(req.id, len(store[req.name]))
        elif req.op == "put":
            store[req.name] = req.data
            s.reply(req.id, None)

    ids = [c.request("get", "packs/" + "a" * 64), c.request("get", "config"),
           c.request("list", prefix=""), c.put("snapshots/x", big[:5000]),
           c.request("size", "snapshots/x")]
    replies, _ = pump(c, s, answer)
    assert isinstance(replies[0], fetch.Hello) and replies[0].device == "server"
    got = {r.id: r for r in replies[1:]}
    assert got[ids[0]].value == big
    assert got[ids[1]].code == fetch.NOT_FOUND
    assert got[ids[2]].value == ["packs/" + "a" * 64]
    assert got[ids[3]].value is None and got[ids[3]].code is None
    assert got[ids[4]].value == 5000 and c.waiting == 0


def test_a_list_of_many_names_comes_in_batches():
    c, s = fetch.FetchClient("client"), fetch.FetchServer("server")
    names = [f"packs/{i:064x}" for i in range(fetch.LIST_BATCH * 2 + 5)]
    rid = c.request("list", prefix="packs/")
    replies, _ = pump(c, s, lambda req: s.reply(req.id, names))
    assert [r for r in replies if isinstance(r, fetch.Reply)] == [fetch.Reply(rid, names)]


def test_an_unknown_operation_is_refused_and_the_session_goes_on():
    c, s = fetch.FetchClient("client"), fetch.FetchServer("server")
    pump(c, s)
    s.receive_data(encode(fetch.VERSION, {"t": "req", "id": 7, "op": "truncate", "name": "x"}))
    s.receive_data(encode(fetch.VERSION, {"t": "newer-frame", "x": 1}))   # skipped
    assert not s.closed
    c._ops[7] = "truncate"  # as if this client were newer and had asked
    replies = c.receive_data(s.data_to_send())
    assert replies[0].code == fetch.REFUSED and "truncate" in replies[0].reason


def test_an_answer_nobody_asked_for_ends_the_session():
    c, s = fetch.FetchClient("client"), fetch.FetchServer("server")
    pump(c, s)
    s.reply(99, b"planted")
    events = c.receive_data(s.data_to_send())
    assert isinstance(events[-1], fetch.Closed) and "did not ask" in events[-1].reason
    assert c.closed and b"error" in c.data_to_send()


def test_names_that_climb_out_of_the_store_end_the_session():
    c, s = fetch.FetchClient("client"), fetch.FetchServer("server")
    pump(c, s)
    for bad in ("../keys/account.key", "/etc/passwd", "packs//x", ""):
        s2 = fetch.FetchServer("server")
        s2.receive_data(fetch.FetchClient("c").data_to_send())
        events = s2.receive_data(encode(fetch.VERSION, {"t": "req", "id": 1, "op": "get",
                                                         "name": bad}))
        assert isinstance(events[-1], fetch.Closed), bad


def test_a_put_larger_than_allowed_ends_the_session():
    s = fetch.FetchServer("server", max_put=1000)
    s.receive_data(fetch.FetchClient("c").data_to_send())
    events = s.receive_data(encode(fetch.VERSION, {"t": "put", "id": 1, "name": "x", "off": 0,
                                                    "total": 10**9, "data": b"", "last": False}))
    assert isinstance(events[-1], fetch.Closed) and "larger than 1000" in events[-1].reason


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.booleans())
def test_random_bytes_never_raise(junk: bytes, to_server: bool):
    c, s = fetch.FetchClient("client"), fetch.FetchServer("server")
    pump(c, s)
    c.request("get", "config")
    pump(c, s)
    end = s if to_server else c
    events = end.receive_data(junk)
    assert all(isinstance(e, (fetch.Closed, fetch.Request, fetch.Reply, fetch.Hello))
               for e in events)
