"""AUN layer: what aund does with each gateway method, in one table (docs/method-rules.md).

The official SDK (fastaun 0.5.25) decides per method what happens around a call: which
methods carry a `client_signature` (its signed-method list, and every `org.*` method, whose
params also get an `aad` naming the organization), which take the instance's protected headers,
which it encrypts end to end before sending (`message.send`, `group.send`, the two
`*.thought.put`), which results it opens before the caller sees them (history pages and thought
reads), which it refuses outright (the login steps), which get its longer timeout
(non-idempotent methods) and which run through its pull gate. aund makes the same decisions, and
every module asks this table instead of keeping its own list; a few columns are aund's own
(`managed`, `route`, `membership`).

The table is written by hand (method names are protocol data); `tests/unit/test_method_rules.py`
reads the SDK's own lists and branches in a subprocess at test time and names every method where
this table and the SDK disagree, so a new SDK release that changes a rule fails the suite.
Pure: no I/O.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping


@dataclass(frozen=True)
class MethodRule:
    """The rules for one method (or, for `org.*`, one family)."""

    name: str
    #: params carry `client_signature` (aund signs with the AID key before sending)
    signed: bool = False
    #: `org.*`: `aad.org_id` bound to the request's `org_id`; signed over canonical JSON
    org_aad: bool = False
    #: takes the session's protected headers (sealed into the E2EE envelope)
    protected_headers: bool = False
    #: the payload is encrypted end to end before it leaves aund
    encrypts: bool = False
    #: the result's messages / thoughts are decrypted before the app sees them
    decrypts_result: bool = False
    #: refused to everyone: a step of the login/connect handshake the link does itself
    internal_only: bool = False
    #: refused to apps: aund pulls and acks messages itself (aund's rule, not the SDK's)
    managed: bool = False
    #: the SDK waits longer for the reply (35 s) because a retry could do the work twice
    non_idempotent: bool = False
    #: a read of a message or event window (the SDK's pull gate)
    pull: bool = False
    #: which part of aund handles an app's call: "gateway" (the link, as is), "p2p" (P2PKeys)
    #: or "group" (GroupSync)
    route: str = "gateway"
    #: a group membership change after which the owner/admin proposes a new signed state
    membership: bool = False
    #: params the SDK refuses in this call (delivery is chosen at connect time, not per message)
    refused_params: tuple[str, ...] = ()


def _family(prefix: str, verbs: str) -> set[str]:
    return {f"{prefix}.{verb}" for verb in verbs.split()}


_STORAGE_WRITES = (
    _family("storage", "put_object delete_object get_by_share create_share_link revoke_share_link "
                       "create_upload_session complete_upload create_folder rename_folder move_folder "
                       "delete_folder move_object copy_object batch_delete set_object_meta append_object "
                       "set_acl remove_acl set_visibility issue_token revoke_token create_symlink "
                       "atomic_repoint rename_symlink delete_symlink")
    | _family("storage.fs", "mkdir remove rename copy mount approve reject unmount invalidate_membership")
    | _family("storage.volume", "create renew expire_due"))
_GROUP_FS = _family("group.fs", "mkdir rm cp mv set_acl remove_acl mount umount check_upload "
                                "create_upload_session complete_upload create_download_ticket")
_COLLAB = _family("collab", "create commit clone prune revert gc unregister") \
    | _family("collab.tag", "create restore rm prune")
_E2EE_SENDS = frozenset({"message.send", "group.send", "message.thought.put", "group.thought.put"})

_SIGNED = frozenset(
    _family("message", "send thought.put")
    | _family("message.v2", "put_peer_pk bootstrap group_bootstrap pull ack")
    | _family("group", "send recall thought.put kick add_member invite_member list_my_invites accept_invite "
                       "reject_invite revoke_invite leave remove_member update set_role transfer_owner "
                       "bind_group_aid renew_group_aid complete_transfer review_join_request "
                       "batch_review_join_request request_join use_invite_code set_settings "
                       "update_announcement update_rules commit_state ban unban block unblock report_status "
                       "dissolve suspend resume")
    | _family("group.v2", "put_group_pk bootstrap send pull ack propose_state confirm_state get_proposal")
    | _STORAGE_WRITES | {"storage.check_access"} | _GROUP_FS | _COLLAB)
_NON_IDEMPOTENT = frozenset(
    _E2EE_SENDS | {"mail.send"} | _family("auth", "create_aid renew_cert rekey")
    | _family("group", "create kick remove_member leave dissolve set_settings add_member bind_group_aid "
                       "renew_group_aid complete_transfer accept_invite reject_invite revoke_invite")
    | _STORAGE_WRITES | _GROUP_FS | _COLLAB)
_INTERNAL_ONLY = frozenset(_family("auth", "login1 aid_login1 login2 aid_login2 connect refresh_token")
                           | {"initialize"})
_DECRYPTS_RESULT = frozenset({"message.history", "group.history", "message.thought.get", "group.thought.get"})
_PULL = frozenset({"message.pull", "message.v2.pull", "message.history", "group.pull", "group.v2.pull",
                   "group.history", "group.pull_events"})
_MANAGED = frozenset({"message.pull", "message.v2.pull", "message.ack", "message.v2.ack", "message.peers",
                      "group.pull", "group.v2.pull", "group.ack_messages", "group.v2.ack", "group.pull_events",
                      "group.ack_events"})
_PER_CALL_DELIVERY = ("affinity_ttl_ms", "delivery_mode", "persist", "queue_routing")
_REFUSED_PARAMS = {"message.send": _PER_CALL_DELIVERY, "group.send": _PER_CALL_DELIVERY}
# calls after which the owner/admin signs a new state: the member set or the admin set changed
_MEMBERSHIP = frozenset(_family("group", "create add_member kick remove_member review_join_request "
                                         "batch_review_join_request set_role complete_transfer use_invite_code"))
_ROUTES = {"p2p": frozenset({"message.send", "message.thought.put", "message.thought.get", "message.history"}),
           "group": frozenset({"group.send", "group.thought.put", "group.thought.get", "group.history",
                               "group.set_settings", "group.bind_group_aid", "group.renew_group_aid",
                               "group.transfer_owner", "group.unblock"}) | _MEMBERSHIP}

#: Methods of these families follow the family's rule unless the table names them.
FAMILIES: Mapping[str, MethodRule] = MappingProxyType({
    "org.": MethodRule("org.*", signed=True, org_aad=True),
})


def _build() -> dict[str, MethodRule]:
    names = (_SIGNED | _NON_IDEMPOTENT | _INTERNAL_ONLY | _DECRYPTS_RESULT | _PULL | _MANAGED | _E2EE_SENDS
             | _ROUTES["p2p"] | _ROUTES["group"])
    route_of = {m: route for route, members in _ROUTES.items() for m in members}
    return {name: MethodRule(name, signed=name in _SIGNED, protected_headers=name in _E2EE_SENDS,
                             encrypts=name in _E2EE_SENDS, decrypts_result=name in _DECRYPTS_RESULT,
                             internal_only=name in _INTERNAL_ONLY, managed=name in _MANAGED,
                             non_idempotent=name in _NON_IDEMPOTENT, pull=name in _PULL,
                             route=route_of.get(name, "gateway"), membership=name in _MEMBERSHIP,
                             refused_params=_REFUSED_PARAMS.get(name, ()))
            for name in sorted(names)}


#: One entry per method the SDK (or aund) treats specially; every other method is a plain
#: gateway call (`rule()` gives it the default, or its family's rule).
TABLE: Mapping[str, MethodRule] = MappingProxyType(_build())


def rule(method: str) -> MethodRule:
    """The rules for `method`: its own entry, else its family's, else a plain gateway call."""
    found = TABLE.get(method)
    if found is not None:
        return found
    for prefix, family in FAMILIES.items():
        if method.startswith(prefix):
            return family
    return MethodRule(method)


def named(attribute: str, value: object = True) -> frozenset[str]:
    """The methods the table names whose `attribute` equals `value` (families not included)."""
    return frozenset(name for name, r in TABLE.items() if getattr(r, attribute) == value)


# The sets other modules use, all derived from the table.
SIGNED = named("signed")
PROTECTED_HEADERS = named("protected_headers")
ENCRYPTS = named("encrypts")
DECRYPTS_RESULT = named("decrypts_result")
INTERNAL_ONLY = named("internal_only")
MANAGED = named("managed")
NON_IDEMPOTENT = named("non_idempotent")
PULL = named("pull")
P2P_ROUTED = named("route", "p2p")
GROUP_ROUTED = named("route", "group")
MEMBERSHIP = named("membership")
#: `org.*` methods that may go without an `org_id` (their `aad.org_id` is then null).
ORG_ID_OPTIONAL = frozenset({"org.lifecycle.list", "org.health", "org.status"})
