"""Print, as JSON, the per-method rules of the installed official SDK (fastaun), read from its own
code: its module-level method lists, and the method names its RPC pipeline branches on.

Run in a subprocess by tests/interop/test_method_rules_sdk.py, which compares the output with
aund's table (aund.aun.methods). Nothing of the SDK is copied: the lists are read at run time,
and the branches are found by parsing the SDK's source with `ast`:

- encrypts: a branch on `method` in `RpcPipeline.call_after_pipeline` that pops `encrypt`;
- decrypts_result: a branch there that calls a `*history*` routine, or a branch in the E2EE
  coordinator's `postprocess_result` that calls a `_decrypt_*` routine;
- pull: the method set `RpcPipeline.raw_call` gives the pull-gate timeout;
- refused_params: the `"x" in params` tests inside a branch on `method` of
  `RpcPipeline.validate_outbound_call` (params the SDK refuses for that method);
- family rules: a branch on `method.startswith(prefix)` whose body signs the call (signed) or
  sets `aad` (org_aad).
"""
from __future__ import annotations

import ast
import inspect
import json
import sys
import textwrap


def _methods_in_test(test: ast.AST) -> set[str]:
    """The method names an `if` test compares `method` with (`==`, `in {...}`, inside and/or)."""
    found: set[str] = set()
    for node in ast.walk(test):
        if not (isinstance(node, ast.Compare) and isinstance(node.left, ast.Name) and node.left.id == "method"):
            continue
        for op, right in zip(node.ops, node.comparators):
            if isinstance(op, ast.Eq) and isinstance(right, ast.Constant) and isinstance(right.value, str):
                found.add(right.value)
            elif isinstance(op, ast.In) and isinstance(right, (ast.Set, ast.Tuple, ast.List)):
                found |= {e.value for e in right.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)}
    return found


def _prefixes_in_test(test: ast.AST) -> set[str]:
    """The prefixes of `method.startswith("...")` calls in an `if` test."""
    return {node.args[0].value for node in ast.walk(test)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "startswith"
            and isinstance(node.func.value, ast.Name) and node.func.value.id == "method"
            and node.args and isinstance(node.args[0], ast.Constant)}


def _branches(func) -> list[ast.If]:
    """Every `if` statement in the source of `func`."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(func)))
    return [node for node in ast.walk(tree) if isinstance(node, ast.If)]


def _body_nodes(branch: ast.If):
    for stmt in branch.body:
        yield from ast.walk(stmt)


def _calls_attr(branch: ast.If, predicate) -> bool:
    return any(isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and predicate(n.func.attr, n)
               for n in _body_nodes(branch))


def _pops_encrypt(attr: str, call: ast.Call) -> bool:
    return attr == "pop" and bool(call.args) and isinstance(call.args[0], ast.Constant) \
        and call.args[0].value == "encrypt"


def _sets_aad(branch: ast.If) -> bool:
    return any(isinstance(n, ast.Assign) and any(isinstance(t, ast.Subscript) and isinstance(t.slice, ast.Constant)
                                                 and t.slice.value == "aad" for t in n.targets)
               for n in _body_nodes(branch))


def main() -> None:
    import aun_core
    from aun_core import client
    from aun_core._client import rpc_pipeline, v2_e2ee

    pipeline = rpc_pipeline.RpcPipeline
    encrypts: set[str] = set()
    decrypts: set[str] = set()
    family_signed: set[str] = set()
    family_aad: set[str] = set()
    for branch in _branches(pipeline.call_after_pipeline):
        names = _methods_in_test(branch.test)
        if _calls_attr(branch, _pops_encrypt):
            encrypts |= names
        if _calls_attr(branch, lambda attr, _: "history" in attr):
            decrypts |= names
        for prefix in _prefixes_in_test(branch.test):
            if _calls_attr(branch, lambda attr, _: attr == "sign_client_operation"):
                family_signed.add(prefix)
            if _sets_aad(branch):
                family_aad.add(prefix)
    for branch in _branches(v2_e2ee.V2E2EECoordinator.postprocess_result):
        if _calls_attr(branch, lambda attr, _: attr.startswith("_decrypt_")):
            decrypts |= _methods_in_test(branch.test)
    refused_params: dict[str, set[str]] = {}
    for branch in _branches(pipeline.validate_outbound_call):
        names = _methods_in_test(branch.test)
        keys = {n.left.value for n in _body_nodes(branch)
                if isinstance(n, ast.Compare) and isinstance(n.left, ast.Constant) and isinstance(n.left.value, str)
                and len(n.ops) == 1 and isinstance(n.ops[0], ast.In) and isinstance(n.comparators[0], ast.Name)
                and n.comparators[0].id == "params"}
        for name in names if keys else ():
            refused_params.setdefault(name, set()).update(keys)
    pull: set[str] = set()
    for branch in _branches(pipeline.raw_call):
        if any(isinstance(n, ast.Name) and n.id == "timeout" for n in ast.walk(branch.test)):
            pull |= _methods_in_test(branch.test)
    json.dump({
        "version": getattr(aun_core, "__version__", ""),
        "signed": sorted(client.AUNClient._SIGNED_METHODS),
        "protected_headers": sorted(client._PROTECTED_HEADERS_METHODS),
        "non_idempotent": sorted(client._NON_IDEMPOTENT_METHODS),
        "internal_only": sorted(client._INTERNAL_ONLY_METHODS),
        "encrypts": sorted(encrypts),
        "decrypts_result": sorted(decrypts),
        "pull": sorted(pull),
        "family_signed": sorted(family_signed),
        "family_org_aad": sorted(family_aad),
        "refused_params": {m: sorted(keys) for m, keys in sorted(refused_params.items())},
    }, sys.stdout)


if __name__ == "__main__":
    main()
