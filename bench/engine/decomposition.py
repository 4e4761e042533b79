"""The decomposition pass: every factorization a set of methods needs, in one pass over the blocks.

The calibration statistics are collected block by block; as each block's
statistics are ready, every pending method factorizes the block's targets
(in worker threads on the CPU) straight into the factor store, so the
statistics of one block at a time are in memory. Afterwards
:func:`factorizations` reads them back from the store: spectra in memory,
factors on use. Each function takes the run's
:class:`~bench.engine.workspace.Workspace` (which imports this module).
"""

from __future__ import annotations

import logging
import time

import torch

from bench.api.configs import config_dict
from bench.api.lowrank import Factorization
from bench.api.method import Context, Method
from bench.api.statistic import CalibrationStats
from bench.corpora import calibration_checksum
from bench.engine.failures import at_layer, check_finite
from bench.engine.grouped import GroupPass
from bench.engine.stores import EntryWriter, factor_tensors, open_entry, store_root, stored_factorizations
from bench.errors import UsageError
from bench.memory import release_free_memory
from bench.storage import cache_root, json_key
from bench.threads import ordered_in_threads

log = logging.getLogger(__name__)


def decomposition_workers(device: str, methods: list[Method]) -> int:
    """Threads for a block's decompositions: one per torch thread on the CPU, each running torch with one
    (see :func:`bench.threads.ordered_in_threads`); one on an accelerator, or when a method's ``decompose``
    is not safe to run beside another (``Method.concurrent_decompose``)."""
    if not device.startswith("cpu") or not all(m.concurrent_decompose for m in methods):
        return 1
    return torch.get_num_threads()


def factor_fields(workspace, method: Method) -> dict:
    """What a decomposition depends on: the store key of ``method``'s factorizations."""
    calibrated = method.uses_calibration()
    return {"model": workspace.loaded.identity, "decomposition": method.decomposition_key(method.config),
            "code": method.decomposition_version(),
            "statistics": {name: workspace.registry.get("statistic", name).version
                           for name in method.decomposition_statistics()},
            "calibration": config_dict(workspace.config.calibration) if calibrated else None,
            "data_sha256": calibration_checksum(workspace.config.calibration.dataset) if calibrated else None,
            "targets": [t.name for t in workspace.targets], "dtype": workspace.config.dtype}


def prepare(workspace, methods: list[Method], collect_with: tuple[str, ...] = ()) -> None:
    """Put every decomposition ``methods`` need into the factor store, in one pass over the blocks."""
    root = store_root("factors")
    pending: dict[str, tuple[Method, dict]] = {}
    for method in methods:
        if not method.decomposes():  # works on the dense targets in refine: nothing to factorize
            continue
        fields = factor_fields(workspace, method)
        key = json_key(fields)
        if key not in pending and open_entry(root, fields, f"{method.name} factorizations") is None:
            pending[key] = (method, fields)
    if not pending:
        return
    chosen = [m for m, _ in pending.values()]
    needed = list(dict.fromkeys([n for m in chosen for n in m.required_statistics()] + list(collect_with)))
    writers = {key: EntryWriter(root, fields) for key, (_, fields) in pending.items()}
    shapes: dict[str, dict] = {key: {} for key in pending}
    facts: dict[str, dict] = {key: {} for key in pending}
    for method in chosen:
        workspace.timings[f"decompose:{method.name}"] = 0.0
    model = workspace.model
    grouped = {key: GroupPass(method, workspace.targets) for key, (method, _) in pending.items()
               if method.groups(workspace.targets, method.config)}

    def record(key, target, factorization):
        writers[key].write_part(factor_tensors(target.name, factorization))
        shapes[key][target.name] = list(factorization.shape)
        if factorization.facts:
            facts[key][target.name] = factorization.facts

    def fail(key, index, error):  # this method fails when it asks for its factorizations; the others go on
        log.warning("%s: decomposition failed in block %d (%s: %s)", pending[key][0].name, index,
                    type(error).__name__, error)
        workspace.failed_decompositions[key] = error
        writers.pop(key).abandon()
        del pending[key]

    def decompose_block(index, block_targets, block_stats, groups):
        """Every pending method on every target of the block, in worker threads (see
        :func:`decomposition_workers`); results are written in target order. A statistic of an input group
        is dropped once the group's last target is done, so the block's largest gram (the MLP down
        projection's, decomposed last) is not held beside the others' during its SVD."""
        stats = CalibrationStats(block_stats, groups)
        methods = {key: method for key, (method, _) in pending.items()}
        contexts = {key: Context(model=model, tokenizer=workspace.loaded.tokenizer, targets=workspace.targets, stats=stats,
                                 calibration=workspace.windows() if method.uses_calibration() else None,
                                 device=workspace.config.device, cache_dir=cache_root(),
                                 model_identity=workspace.loaded.identity)
                    for key, method in methods.items()}
        for key, joint in grouped.items():  # groups sharing a factor, once their last member's block is here
            try:
                for group, found in joint.on_block(block_targets, block_stats, groups, contexts[key]):
                    for target in group:
                        check_finite(found[target.name].s, target.name, "decompose", "singular values")
                        record(key, target, found[target.name])
            except UsageError:
                raise
            except Exception as error:
                fail(key, index, error)
        last_of_group = {groups.get(t.name, t.name): t.name for t in block_targets}
        jobs = [(target, key) for target in block_targets for key in methods
                if key in pending and not (key in grouped and grouped[key].covers(target.name))]
        last_job = {target.name: (target, key) for target, key in jobs}

        def decompose(job):
            target, key = job
            if key not in pending:  # it failed on an earlier target
                return None, 0.0
            start = time.perf_counter()
            with at_layer(target.name):
                factorization = methods[key].decompose(target, contexts[key].weight(target), contexts[key],
                                                       methods[key].config)
                check_finite(factorization.s, target.name, "decompose", "singular values")
            return factorization, time.perf_counter() - start

        start, busy = time.perf_counter(), dict.fromkeys(methods, 0.0)
        workers = decomposition_workers(workspace.config.device, list(methods.values()))
        for (target, key), outcome, error in ordered_in_threads(decompose, jobs, workers):
            if key in pending and error is None:
                factorization, busy_seconds = outcome
                busy[key] += busy_seconds
                record(key, target, factorization)
                del factorization, outcome
            elif key in pending:
                if isinstance(error, UsageError):
                    raise error
                fail(key, index, error)
            group = groups.get(target.name, target.name)
            if last_job[target.name] == (target, key) and last_of_group.get(group) == target.name:
                for table in block_stats.values():  # no later target of the block reads them
                    table.pop(group, None)
        # the block's wall time, shared among the methods in proportion to their threads' busy time
        wall = time.perf_counter() - start
        workspace.decomposing_seconds += wall
        for key, seconds in busy.items():
            label = f"decompose:{methods[key].name}"
            workspace.timings[label] = round(workspace.timings[label] + wall * seconds / (sum(busy.values()) or 1.0), 3)
        release_free_memory()

    log.info("decomposing for %s, block by block", ", ".join(m.name for m in chosen))
    try:
        workspace.collect(needed, decompose_block)
        for key, (method, _) in pending.items():
            writers[key].finish({"method": method.name, "shapes": shapes[key], "facts": facts[key]})
            if key in grouped:
                workspace.timings[f"decompose:{method.name}"] += round(grouped[key].seconds, 3)
    except BaseException:
        for writer in writers.values():
            writer.abandon()
        raise


def factorizations(workspace, method: Method, collect_with: tuple[str, ...] = ()) -> dict[str, Factorization]:
    """Every target's factorization, from the factor store (made first when missing); none for a method without
    ``decompose`` (it quantizes or restructures the dense targets in ``refine``)."""
    if not method.decomposes():
        return {}
    fields = factor_fields(workspace, method)
    key, root = json_key(fields), store_root("factors")
    entry = open_entry(root, fields, f"{method.name} factorizations")
    if entry is None:
        if key not in workspace.failed_decompositions:
            prepare(workspace, [method], collect_with)
            entry = open_entry(root, fields, f"{method.name} factorizations")
        if key in workspace.failed_decompositions:
            raise workspace.failed_decompositions[key]
        if entry is None:
            raise RuntimeError(f"the {method.name} factorizations were written but cannot be read back from {root}")
    start = time.perf_counter()
    found = stored_factorizations(entry)
    workspace.timed(f"factors:{method.name}", start)
    return found

