"""Tenants' session id namespaces: the store key of a client's id, and back."""

from __future__ import annotations

from gruserve.sessions.owner import ANYONE, Caller, client_id, legacy_key, scoped, tenant_of
from gruserve.sessions.service import SESSION_ID, STORE_KEY

IDS = ["station-7", "v2:demo:42", "a", "0.x_y:z-1"]
CALLERS = [ANYONE, Caller(""), Caller("acme"), Caller("b.c-d_e"), Caller("root", admin=True)]


def test_each_tenant_has_its_own_keys_and_no_client_id_is_one() -> None:
    keys = {(c.name, c.key(i)) for c in CALLERS for i in IDS}
    assert len({k for _, k in keys}) == len(IDS) * 4  # "" (3 callers), acme, b.c-d_e, root
    for name, key in keys:
        assert STORE_KEY.fullmatch(key) and tenant_of(key) == name and client_id(key) in IDS
        assert bool(SESSION_ID.fullmatch(key)) == (name == "")  # a scoped key is no client id
    assert Caller("").key("station-7") == "station-7"  # unnamed: stored exactly as before


def test_an_admin_names_every_key_and_gets_it_back() -> None:
    root = Caller("root", admin=True)
    for tenant in ("", "acme", "root"):
        for i in IDS:
            key = scoped(tenant, i)
            shown = root.shown(key)
            assert root.key(shown) == key and ANYONE.key(ANYONE.shown(key)) == key
            assert shown == (i if tenant == "root" else f"{tenant}~{i}")


def test_a_non_admin_cannot_name_another_namespace() -> None:
    for caller in (Caller(""), Caller("acme")):
        for qualified in ("acme~station-7", "~station-7", "beta~x"):
            key = caller.key(qualified)
            assert not STORE_KEY.fullmatch(key) and client_id(key) == qualified


def test_where_records_from_before_namespaces_are() -> None:
    assert legacy_key("~acme~station-7") == "station-7"
    assert legacy_key("~acme~v2:demo:42") == "v2:demo:t.acme:42"
    assert legacy_key("~acme~v2:demo:s:user-7") == "v2:demo:t.acme:s:user-7"
    assert legacy_key("station-7") is None  # the unnamed tenant's never moved
    assert Caller("acme").shown("station-7", owner="acme") == "station-7"
