"""Every generated figure in the docs traces to a JSON under results/: regenerating the docs
from those files changes nothing, so a figure edited by hand, or a JSON rerun without
regenerating the doc, fails here."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"waldo_bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def test_performance_doc_is_generated():
    assert _script("write_performance_doc").render() == (ROOT / "docs" / "performance.md").read_text()


def test_results_doc_blocks_are_generated():
    doc = (ROOT / "docs" / "results.md").read_text()
    assert _script("write_results_doc").render(doc) == doc


def _block(doc: str, name: str) -> str:
    from waldo_experiments.doc_blocks import markers

    start, end = markers(name)
    return (ROOT / doc).read_text().split(start, 1)[1].split(end, 1)[0].strip()


def _results(name: str) -> dict:
    return json.loads((ROOT / "results" / name).read_text())


def test_ann_table_is_generated():
    assert _block("docs/results.md", "ann") == _script("ann_search").markdown(_results("ann_search.json"))


def test_readme_ray_timings_are_generated():
    assert _block("README.md", "ray-build") == _script("ray_build").markdown(_results("ray_build.json"))


def test_service_latency_tables_are_generated():
    load_test = _script("load_test")
    for block, result in (("load-one-client", "load_one_client.json"), ("load-four-clients", "load_four_clients.json")):
        assert _block("docs/service.md", block) == load_test.markdown(_results(result)).strip()


def test_reliability_crash_table_is_generated():
    assert _block("docs/reliability.md", "crash-kill") == _script("crash_kill").markdown(_results("crash_kill.json"))


def test_rrt_views_blocks_are_generated():
    """docs/results.md's issue-15 blocks (shipped reranker, precision, adapt, ablation) are what
    experiments/rrt_views.py renders from results/rrt_views/."""
    spec = importlib.util.spec_from_file_location("waldo_rrt_views", ROOT / "experiments" / "rrt_views.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    doc = (ROOT / "docs" / "results.md").read_text()
    assert module.render(doc) == doc
    for name in module.BLOCKS:
        assert f"<!-- {name}:start -->" in doc, name


def test_global_sweep_block_is_generated():
    """docs/results.md's issue-16 pooling x projection table is what experiments/global_sweep.py
    renders from results/global/."""
    spec = importlib.util.spec_from_file_location("waldo_global_sweep", ROOT / "experiments" / "global_sweep.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.block().split(module.START, 1)[1].split(module.END, 1)[0].strip() == _block("docs/results.md", "global-sweep")


def test_global_trained_block_is_generated():
    """docs/results.md's learned-whitening table is what experiments/global_trained.py renders
    from results/global/trained.json and results/core_eval.json."""
    spec = importlib.util.spec_from_file_location("waldo_global_trained", ROOT / "experiments" / "global_trained.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.block().split(module.START, 1)[1].split(module.END, 1)[0].strip() == _block("docs/results.md",
                                                                                              "global-trained")


def _experiment(name: str):
    spec = importlib.util.spec_from_file_location(f"waldo_experiment_{name}", ROOT / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def test_gv_compact_block_is_generated():
    """docs/results.md's issue-17 verification tables are what experiments/gv_compact.py renders
    from results/gv_compact.json."""
    module = _experiment("gv_compact")
    rendered = module.markdown(_results("gv_compact.json"))
    assert rendered.split(module.START, 1)[1].split(module.END, 1)[0].strip() == _block("docs/results.md", "gv-compact")


def test_gv_fusion_block_is_generated():
    """docs/results.md's issue-17 fusion-rule tables are what experiments/gv_fusion.py renders
    from results/gv_fusion.json, and the product's default rule is the one it chose."""
    from waldo.rerank.gv import GVConfig

    module = _experiment("gv_fusion")
    results = _results("gv_fusion.json")
    rendered = module.markdown(results)
    assert rendered.split(module.START, 1)[1].split(module.END, 1)[0].strip() == _block("docs/results.md", "gv-fusion")
    rule = dict(results["chosen"]["rule"])
    off = rule.pop("max_anisotropy") >= 1e8  # the study writes "off" as 1e9, the product as inf
    assert {k: getattr(GVConfig(), k) for k in rule} == rule and (GVConfig().max_anisotropy >= 1e8) == off


def test_gv_fusion_with_block_is_generated():
    """The issue-17 block that adds make demo's model to the rule's validation is what
    `experiments/gv_fusion.py --add-model lite0-lw-rrt` renders from its saved JSON, and the
    default rule it compares against is the product's."""
    from waldo.rerank.gv import GVConfig

    module = _experiment("gv_fusion")
    results = _results("gv_fusion_with_lite0-lw-rrt.json")
    rendered = module.markdown_with(results)
    start, end = module.WITH_MARKERS
    assert rendered.split(start, 1)[1].split(end, 1)[0].strip() == _block("docs/results.md", "gv-fusion-with")
    rule = dict(results["default"]["rule"])
    rule.pop("max_anisotropy")
    assert {k: getattr(GVConfig(), k) for k in rule} == rule


def test_gv_object_block_is_generated():
    """The issue-17 study of whether a match is on the photos' subject is what
    experiments/gv_object.py renders from results/gv_object.json, and the product's rule
    (the two subject checks included) is the one it chose."""
    from waldo.rerank.gv import GVConfig

    module = _experiment("gv_object")
    results = _results("gv_object.json")
    rendered = module.markdown(results)
    assert rendered.split(module.START, 1)[1].split(module.END, 1)[0].strip() == _block("docs/results.md", "gv-object")
    assert {k: getattr(GVConfig(), k) for k in results["chosen"]["rule"]} == results["chosen"]["rule"]


def test_global_adapt_table_is_generated():
    """The issue-16 adaptation table in docs/results.md is `experiments/global_adapt.py --table`."""
    table = _experiment("global_adapt").table(_results("global/adapt.json")["rows"])
    assert table in (ROOT / "docs" / "results.md").read_text()


def test_global_pooling_verified_table_is_generated():
    """The issue-16 label-free pooling table in docs/results.md is `experiments/global_pooling_verified.py --table`."""
    table = _experiment("global_pooling_verified").table(_results("global/pooling_verified.json"))
    assert table in (ROOT / "docs" / "results.md").read_text()


def test_local_matching_table_is_generated():
    """The issue-15 local-matching table in docs/results.md is `experiments/local_matching.py --both`."""
    table = _experiment("local_matching").combined_table(_results("rrt_views/local-matching.json"),
                                                          _results("rrt_views/local-matching-refit.json"))
    assert table in (ROOT / "docs" / "results.md").read_text()


def test_finer_locals_table_is_generated():
    """The issue-15 finer-locals table in docs/results.md is `experiments/local_matching.py --finer`."""
    module = _experiment("local_matching")
    table = module.finer_table([_results(f"rrt_views/{name}") for _, name in module.FINER],
                               _results(f"rrt_views/{module.UNTRAINED_FILE}"))
    assert table in (ROOT / "docs" / "results.md").read_text()


def test_compact_cells_table_is_generated():
    """The issue-15 stored-form table in docs/results.md is `experiments/local_matching.py --compact`."""
    module = _experiment("local_matching")
    table = module.compact_table([_results(f"rrt_views/{name}") for _, name in module.COMPACT])
    assert table in (ROOT / "docs" / "results.md").read_text()


def test_global_ensemble_table_is_generated():
    """The issue-16 fusion table in docs/results.md is `experiments/global_ensemble.py --table`."""
    table = _experiment("global_ensemble").table(_results("global/ensemble.json")["rows"])
    assert table in (ROOT / "docs" / "results.md").read_text()


def test_global_guard_block_is_generated():
    """The issue-16 SGD guard table in docs/results.md is `experiments/global_guard.py --doc`."""
    module = _experiment("global_guard")
    for source in module.SOURCES.values():
        if not source.out.exists():
            continue
        start, end = module.markers(source)
        block = module.block(json.loads(source.out.read_text()), source)
        assert block.split(start, 1)[1].split(end, 1)[0].strip() == _block("docs/results.md", source.block_name)


def test_global_multiscale_table_is_generated():
    """The issue-16 multi-scale table in docs/results.md is `experiments/global_multiscale.py --table`."""
    table = _experiment("global_multiscale").table(_results("global/multiscale.json")["rows"])
    assert table in (ROOT / "docs" / "results.md").read_text()


def test_readme_which_reranker_table_is_generated():
    spec = importlib.util.spec_from_file_location("waldo_exp_rrt_views", ROOT / "experiments" / "rrt_views.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    later = [_results(f"rrt_views/{name}") for name in module.WHICH_RERANKER_LATER]
    assert _block("README.md", "which-reranker") == module.readme_which_reranker()
    # a later run that measures a ranking the table holds must agree with it
    clash = json.loads(json.dumps(later[0]))
    clash["protocols"]["grocery-open-cross"]["rrt"]["recall@1"] += 0.01
    with pytest.raises(ValueError, match="disagrees"):
        module.which_reranker_block(_results(f"rrt_views/{module.WHICH_RERANKER}"), [clash])


def test_reliability_resource_table_is_generated():
    assert _block("docs/reliability.md", "resource-abuse") == _script("resource_abuse").markdown(
        _results("resource_abuse.json"))


def test_shard_rerank_block_is_generated():
    """docs/results.md's issue-20 table is what experiments/shard_rerank.py renders from results/shard_rerank.json."""
    module = _experiment("shard_rerank")
    rendered = module.markdown(_results("shard_rerank.json"))
    assert rendered.split(module.START, 1)[1].split(module.END, 1)[0].strip() == _block("docs/results.md", "shard-rerank")


def test_serve_shards_blocks_are_generated():
    """The sharded-service tables (docs/performance.md, docs/scaling.md) and docs/scaling.md's estimates are
    what benchmarks/serve_shards.py renders from results/serve_shards.json (and results/ann_search.json)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("serve_shards", ROOT / "benchmarks" / "serve_shards.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    results = _results("serve_shards.json")
    table = module.markdown(results).split(module.START, 1)[1].split(module.END, 1)[0].strip()
    assert table == _block("docs/performance.md", "serve-shards") == _block("docs/scaling.md", "serve-shards")
    estimates = module.scaling_markdown(results, _results("ann_search.json"))
    assert estimates.split(module.SCALING_START, 1)[1].split(module.SCALING_END, 1)[0].strip() == \
        _block("docs/scaling.md", "scaling-estimates")
    # Every layout answered every query whole, and the 1-shard layout holds the whole index.
    assert all(run["errors"] == 0 and run["partial"] == 0 for layout in results["layouts"] for run in layout["runs"])
    assert results["layouts"][0]["shards"] == 1 and results["layouts"][0]["images"] == results["source"]["images"]


def test_gv_positives_block_is_generated():
    """docs/results.md's issue-15 label study is what experiments/gv_positives.py renders from its JSON."""
    module = _experiment("gv_positives")
    rendered = module.markdown(_results("gv_positives.json"))
    assert rendered.split(module.START, 1)[1].split(module.END, 1)[0].strip() == _block("docs/results.md", "gv-positives")


def test_adapt_verified_block_is_generated():
    """docs/results.md's `index adapt --group-verified` table is what experiments/adapt_verified.py renders."""
    module = _experiment("adapt_verified")
    rendered = module.markdown(_results("adapt_verified.json"))
    assert rendered.split(module.START, 1)[1].split(module.END, 1)[0].strip() == _block("docs/results.md", "adapt-verified")
    # the same study on make demo's model (plain adapt only), in a block of its own
    # and on the RRT that starts as local matching (a run folder's model)
    # and on make demo's lite0-match-rrt
    for name, block in (("adapt_lw.json", "adapt-lw"), ("adapt_s4_match.json", "adapt-s4-match"),
                        ("adapt_match_rrt.json", "adapt-match-rrt")):
        start, end, _ = module._block_names(module.ROOT / "results" / name)
        rendered = module.markdown(_results(name), start, end)
        assert rendered.split(start, 1)[1].split(end, 1)[0].strip() == _block("docs/results.md", block)


def test_adapt_lr_block_is_generated():
    """docs/results.md's choice of index adapt's fine-tuning lr is what experiments/adapt_lr.py renders,
    and the lr it records as chosen is the rule's on its validation figures and the product's."""
    from waldo.train.adapt import FINETUNE_LR

    module = _experiment("adapt_lr")
    results = _results("adapt_lr.json")
    rendered = module.markdown(results)
    assert rendered.split(module.START, 1)[1].split(module.END, 1)[0].strip() == _block("docs/results.md", "adapt-lr")
    assert results["chosen_lr"] == module.chosen_lr(results["collections"]["validation"]) == FINETUNE_LR


def test_adapt_patience_block_is_generated():
    """docs/results.md's choice of adapt's early stopping is what experiments/adapt_patience.py renders,
    and the patience it records as chosen is the rule's on its validation figures and adapt's default."""
    from waldo.train.adapt import ADAPT_DEFAULTS

    module = _experiment("adapt_patience")
    results = _results("adapt_patience.json")
    rendered = module.markdown(results)
    assert rendered.split(module.START, 1)[1].split(module.END, 1)[0].strip() == _block("docs/results.md",
                                                                                          "adapt-patience")
    assert results["chosen_patience"] == module.chosen_patience(results["collections"]["validation"])
    assert results["chosen_patience"] == ADAPT_DEFAULTS["patience"]


def test_rrt_consensus_block_is_generated_and_its_adopted_cell_is_what_serving_reads():
    """docs/results.md's neighbourhood-consensus study is what experiments/rrt_consensus.py renders;
    its best cell is the rule's on the stored figures, and the shipped model serves exactly it."""
    from waldo.models.shipped import resolve_model_dir
    from waldo.rerank.rrt_checkpoint import read_rrt_info
    from waldo.rerank.rrt_rerankers import consensus_setting
    from waldo.train.rrt_online import earns_default

    module = _experiment("rrt_consensus")
    results = _results("rrt_consensus.json")
    rendered = module.markdown(results)
    assert rendered.split(module.START, 1)[1].split(module.END, 1)[0].strip() == _block("docs/results.md",
                                                                                          "rrt-consensus")
    v = results["validation"]
    cells = [f"rrt+consensus k={k} t={t:g}" for k in module.KS for t in module.WEIGHTS]
    best = max(cells, key=lambda name: (v["rows"][name]["macro"][v["metric"]], -cells.index(name)))
    per_set = lambda name: [e[v["metric"]] for e in v["rows"][name]["sets"].values()]  # noqa: E731
    assert best == v["best"] and v["adopted"] == earns_default(per_set(best), per_set("rrt"), v["margin"])
    training = read_rrt_info(resolve_model_dir(module.MODEL))["training"]
    assert f"rrt+consensus k={consensus_setting(training)[0]} t={consensus_setting(training)[1]:g}" == best
    # the chain's choice for an index without keypoints (its first needs them: consensus_gv below)
    chain = [training["default_reranker"], *training.get("default_fallbacks", [])]
    assert chain[-1] == ("rrt-consensus" if v["adopted"] else "rrt")


def test_consensus_gv_block_is_generated_and_the_default_chain_is_its_rule():
    """docs/results.md's rrt-consensus+gv study is what experiments/consensus_gv.py renders; the
    default rule re-applied to its stored validation rows gives the chain the shipped model's
    rrt.json and card store, and an index without keypoints gets the chain's last."""
    from waldo.models.shipped import resolve_model_dir
    from waldo.rerank import RERANKERS, Need
    from waldo.rerank.rrt_checkpoint import read_rrt_info

    module = _experiment("consensus_gv")
    results = _results("consensus_gv.json")
    rendered = module.markdown(results)
    assert rendered.split(module.START, 1)[1].split(module.END, 1)[0].strip() == _block("docs/results.md",
                                                                                          "consensus-gv")
    choice = module.default_choice(results["validation"])
    assert results["default"] == choice
    folder = resolve_model_dir(module.MODEL)
    training = read_rrt_info(folder)["training"]
    card = json.loads((folder / "card.json").read_text())["chosen_on_validation"]
    assert [training["default_reranker"], *training["default_fallbacks"]] == choice["chain"]
    assert [card["default_reranker"], *card["default_fallbacks"]] == choice["chain"]
    assert Need.KEYPOINTS not in RERANKERS.spec(choice["chain"][-1]).needs


def test_local_match_product_table_is_generated():
    """The local-match table in docs/results.md is `experiments/local_matching.py --product`."""
    module = _experiment("local_matching")
    table = module.product_table(_results(f"rrt_views/{module.PRODUCT_FILE}"))
    assert table in (ROOT / "docs" / "results.md").read_text()


def test_local_match_checkpoint_table_is_generated():
    """make demo's checkpoint with stage locals in docs/results.md is `local_matching.py --checkpoint`."""
    table = _experiment("local_matching").checkpoint_table(ROOT / "results" / "local_match",
                                                           ROOT / "results" / "rrt_views" / "shipped-which-reranker.json")
    assert table in (ROOT / "docs" / "results.md").read_text()



def test_gv_after_rrt_table_is_generated():
    """The issue-15 table of how GV should follow the RRT is `experiments/gv_after_rrt.py --table`;
    it chose the rule the product keeps after another reranker (verified candidates first, whose
    scores are inlier counts: tests/serve/test_api.py)."""
    result = _results("rrt_views/gv-after-rrt.json")
    assert _experiment("gv_after_rrt").table(result) in (ROOT / "docs" / "results.md").read_text()
    assert {c["chosen"] for c in result["choice"].values()} == {"verified first"}


def test_global_refit_table_is_generated():
    """The issue-16 table of trained backbones under a refitted projection is
    `experiments/global_refit.py --table`."""
    result = _results("global/refit.json")
    doc = (ROOT / "docs" / "results.md").read_text()
    assert _experiment("global_refit").table(result) in doc
    # the shipped backbone's figures, scored from the shipped files (--ship), are the ones quoted
    shipped = result["shipped"]["tests"]
    quoted = ", ".join(f"{p} {shipped[p]['recall@1']:.4f} / {shipped[p]['map']:.4f}"
                       for p in ("grocery-open-cross", "coil100-open"))
    assert f"--backbone-from lite0-global`): {quoted}" in " ".join(doc.split())



def test_the_reverse_transfer_check_is_quoted_and_ranks_as_stated():
    """docs/results.md quotes `global_refit.py --transfer-check coil` as measured, and its claim
    holds: the leave-one-out mAP order of the coil-trained backbones is the grocery-open-cross
    test's but for one adjacent pair, and its best row is `sgd`."""
    result = _results("global/refit.json")
    doc = " ".join((ROOT / "docs" / "results.md").read_text().split())
    check = result["transfer_check_coil"]["rows"]
    for name, row in check.items():
        label = name if name == "ImageNet" else f"`{name}`"
        assert f"{label} {row['leave-one-out']['map']:.4f}" in doc, name
    tests = {r["run"] or "ImageNet": r["tests"]["grocery-open-cross"]["map"] for r in result["rows"]
             if r["source"] in ("coil", None) and r.get("blend") is None}
    by_check = sorted(check, key=lambda n: -check[n]["leave-one-out"]["map"])
    by_test = sorted(check, key=lambda n: -tests[n])
    swapped = [i for i, (a, b) in enumerate(zip(by_check, by_test)) if a != b]
    assert len(swapped) == 2 and swapped[1] == swapped[0] + 1 and by_check[0] == "sgd"


def test_the_transfer_grid_is_generated_and_shipped_by_its_declared_rule():
    """The issue-16 grid of experiments/global_transfer_grid.py: its table is the script's, the
    shipping decision follows the rule declared before its trained rows were scored (the grocery
    choice ships iff its validation mean is above the ImageNet row's), the shipped backbone is
    that run, its figures from the shipped files are the ones quoted, and the docs' claim holds
    that grocery photos rank the coil runs in the grocery-open-cross test's mAP order."""
    grid = _experiment("global_transfer_grid")
    result = _results("global/transfer_grid.json")
    doc = (ROOT / "docs" / "results.md").read_text()
    assert grid.table(result) in doc
    rows = result["sources"]["grocery"]
    chosen, untrained = grid.chosen_row(rows), next(r for r in rows if r["run"] is None)
    ship = result["ship"]
    assert ship["run"] == chosen["run"]
    assert ship["ships"] == (chosen["validation_mean"] > untrained["validation_mean"])
    if ship["ships"]:
        card = json.loads((ROOT / "waldo" / "pretrained" / "lite0-global" / "card.json").read_text())
        if "global_transfer_grid.py" in card["run"]:  # else a later study (the seed grid) shipped since
            assert card["run"].startswith(f"grocery `{chosen['run']}`")
        tests = ship["shipped"]["tests"]
        quoted = ", ".join(f"{p} {tests[p]['recall@1']:.4f} / {tests[p]['map']:.4f}"
                           for p in ("grocery-open-cross", "coil100-open"))
        assert f"`waldo eval --protocol P --backbone-from lite0-global`): {quoted}" in " ".join(doc.split())
    coil = [r for r in result["sources"]["coil"] if r["run"] is not None]
    by_validation = sorted(coil, key=lambda r: -r["validation"]["other whole"])
    by_test = sorted(coil, key=lambda r: -r["tests"]["grocery-open-cross"]["map"])
    assert [r["run"] for r in by_validation] == [r["run"] for r in by_test]


def test_the_seed_grid_is_generated_and_shipped_by_its_declared_rule():
    """experiments/global_seed_grid.py: its table is the script's, its seed-1 rows are the transfer
    grid's (reused, not rescored), and the shipping decision is the rule declared before seeds 2
    and 3 were trained: the variant with the best mean validation over the seeds, its
    best-validated seed, shipped iff the variant's mean is above the ImageNet backbone's."""
    seeds = _experiment("global_seed_grid")
    result = _results("global/seed_grid.json")
    doc = (ROOT / "docs" / "results.md").read_text()
    assert seeds.table(result) in doc
    rows = result["rows"]
    assert len(rows) == len(seeds.SEEDS) * (1 + len(seeds.VARIANT_SET))
    for grid_row in _results("global/transfer_grid.json")["sources"]["grocery"]:
        assert seeds.find(rows, grid_row["run"], seeds.GRID_SEED)["validation"] == grid_row["validation"]
    decision, ship = seeds.choice(rows), result["ship"]
    assert (ship["run"], ship["seed"], ship["ships"]) == (decision["run"], decision["seed"], decision["ships"])
    assert decision["ships"] == (decision["score"] > decision["untrained_score"])
    if ship["ships"]:
        card = json.loads((ROOT / "waldo" / "pretrained" / "lite0-global" / "card.json").read_text())
        assert card["run"].startswith(f"grocery `{ship['run']}`, seed {ship['seed']}")
        assert card["chosen_on_validation"]["check"]["seed"] == ship["seed"]
        tests = ship["shipped"]["tests"]
        quoted = ", ".join(f"{p} {tests[p]['recall@1']:.4f} / {tests[p]['map']:.4f}"
                           for p in ("grocery-open-cross", "coil100-open"))
        assert f"`waldo eval --protocol P --backbone-from lite0-global`): {quoted}" in " ".join(doc.split())


def test_the_paired_transfer_comparison_is_generated_from_the_same_runs():
    """experiments/global_paired.py's table is in docs/results.md, and its two sides are the
    figures quoted elsewhere: the untrained default's tests and the shipped backbone's."""
    result = _results("global/paired.json")
    assert _experiment("global_paired").table(result) in (ROOT / "docs" / "results.md").read_text()
    grid = _results("global/transfer_grid.json")
    untrained = next(r for r in grid["sources"]["grocery"] if r["run"] is None)["tests"]
    shipped = _results("global/seed_grid.json")["ship"]["shipped"]["tests"]  # what lite0-global is now
    for row in result["rows"]:
        c, protocol = row["comparison"], row["protocol"]
        for metric in ("recall@1", "map"):
            assert c[metric]["a"] == pytest.approx(untrained[protocol][metric], abs=1e-9)
            if row["folder"] == "waldo/pretrained/lite0-global":
                assert c[metric]["b"] == pytest.approx(shipped[protocol][metric], abs=1e-9)
            low, high = c[metric]["ci95"]
            assert low <= c[metric]["difference"] <= high


@pytest.mark.parametrize("script, results, block", [
    ("rrt_seeds", "rrt_seeds.json", "rrt-seeds"), ("rrt_dropout", "rrt_dropout.json", "rrt-dropout"),
    ("rrt_colour", "rrt_colour.json", "rrt-colour"), ("colour_diagnostic", "colour_diagnostic.json", "colour-diagnostic"),
    ("colour_weight", "colour_weight.json", "colour-weight"), ("colour_groups", "colour_groups.json", "colour-groups"),
    ("colour_groups", "colour_groups_held-out.json", "colour-groups-held-out"),
    ("colour_untrained", "colour_untrained.json", "colour-untrained"), ("rrt_colour_ft", "rrt_colour_ft.json", "rrt-colour-ft"),
    ("gv_centre_share", "gv_centre_share.json", "gv-centre-share"), ("gv_centre_crop", "gv_centre_crop.json", "gv-centre-crop"),
    ("rrt_half", "rrt_half.json", "rrt-half"), ("rrt_half", "rrt_half_split1.json", "rrt-half-split1"),
    ("rrt_half", "rrt_half_split2.json", "rrt-half-split2"), ("rrt_swap", "rrt_swap.json", "rrt-swap"),
    ("rrt_half", "rrt_half_swap.json", "rrt-half-swap"), ("rrt_swap", "rrt_swap_scratch.json", "rrt-swap-scratch")])
def test_rrt_variant_blocks_are_generated(script, results, block):
    """The seed, dropout and colour studies' blocks in docs/results.md are what their scripts
    render from the committed JSON; a variant study's verdict is its declared rule's."""
    from waldo_experiments.doc_blocks import markers

    module = _experiment(script)
    saved = _results(results)
    rendered = module.markdown(saved)
    start, end = markers(block)
    assert rendered.split(start, 1)[1].split(end, 1)[0].strip() == _block("docs/results.md", block)
    if "validation" in saved and "rule" in saved["validation"]:
        v = saved["validation"]
        assert v["adopted"] == all(v["rule"].values())


def test_rrt_swap_verdict_is_rrt_colour_ft_rule_on_its_figures():
    """experiments/rrt_swap.py declared experiments/rrt_colour_ft.py's rule for both its candidates
    (the fine-tune and the run from the start): each saved verdict is that rule recomputed from
    the saved rows."""
    swap = _experiment("rrt_swap")
    for name, label in (("rrt_swap.json", swap.TUNED), ("rrt_swap_scratch.json", swap.SCRATCH["label"])):
        saved = _results(name)["validation"]
        assert label in saved["rows"]
        assert _experiment("rrt_colour_ft").judge(saved["rows"], label)["rule"] == saved["rule"]


def test_rrt_half_verdict_and_fusion_follow_their_rules():
    """experiments/rrt_half.py: the saved verdict is its declared rule on the saved figures, the
    follow-up's weight is choose_fusion's on its saved grid, and make demo's rrt-fusion weight is
    the stored one unless that choice was adopted."""
    from waldo.models.shipped import resolve_model_dir
    from waldo.rerank.rrt_checkpoint import read_rrt_info

    module = _experiment("rrt_half")
    saved = _results("rrt_half.json")
    assert module.verdict(saved) == saved["verdict"]
    for k in (1, 2):
        other = _results(f"rrt_half_split{k}.json")
        assert other["split_seed"] == k and module.verdict(other) == other["verdict"]
    swapped = _results("rrt_half_swap.json")  # experiments/rrt_swap.py's diagnostic, split 0's identities
    assert swapped["swap"] and swapped.get("split_seed", 0) == 0 and module.verdict(swapped) == swapped["verdict"]
    assert swapped["sets"] == saved["sets"]
    fused = _results("rrt_half_fusion.json")
    assert saved["verdict"]["reproduces"]  # the follow-up runs only on a validation that does
    chosen = module.choose_fusion(fused["global"], fused["cells"])
    assert chosen["weight"] == fused["chosen"] and chosen["allowed"] == fused["allowed"]
    assert fused["adopted"] == (fused["chosen"] < 1 and fused["chosen"] != fused["stored_before"])
    stored = read_rrt_info(resolve_model_dir("lite0-match-rrt"))["training"]["fusion_weight"]
    assert stored == (fused["chosen"] if fused["adopted"] else fused["stored_before"])
    for name in ("rrt_half_chain.json", "rrt_half_chain_split1.json", "rrt_half_chain_split2.json"):
        chain = module.default_chain(_results(name)["rows"])
        assert chain["chain"][-1] in ("global", "rrt", "rrt-consensus") and len(chain["steps"]) == 3


def test_colour_groups_splits_block_is_generated():
    """The three-split validation block is what experiments/colour_groups.py --doc-splits renders
    from the committed split results and the test runs it quotes."""
    from waldo_experiments.doc_blocks import markers

    rendered = _experiment("colour_groups").splits_markdown()
    start, end = markers("colour-groups-splits")
    assert rendered.split(start, 1)[1].split(end, 1)[0].strip() == _block("docs/results.md", "colour-groups-splits")


def test_shipped_colour_weight_is_the_validation_choice():
    """make demo's model carries the colour weight experiments/colour_weight.py adopted on the fair
    validation, its card records that choice, and the default chain it keeps is the default rule
    re-applied to the coloured validation rows; its test figures are the coloured model's run."""
    from waldo.models.checkpoint import ModelConfig
    from waldo.models.shipped import resolve_model_dir
    from waldo.rerank.rrt_checkpoint import read_rrt_info

    module = _experiment("colour_weight")
    v = _results("colour_weight.json")["validation"]
    assert v["adopted"] and v["adopted"] == all(v["rule"].values())
    folder = resolve_model_dir(module.MODEL)
    assert ModelConfig.model_validate_json((folder / "config.json").read_text()).colour_weight == v["chosen_weight"]
    card = json.loads((folder / "card.json").read_text())
    colour = card["chosen_on_validation"]["colour"]
    assert colour["weight"] == v["chosen_weight"] and colour["rule"] == v["rule"]
    chain = module.chain_on_colour(v)
    training = read_rrt_info(folder)["training"]
    assert chain["adopted"] and chain["chain"] == [training["default_reranker"], *training["default_fallbacks"]]
    assert colour["default_chain_on_colour"] == {"chain": chain["chain"], "rule": chain["rule"]}
    if module.TEST_RESULTS.is_file():
        assert card["test"]["sources"] == [f"results/rrt_views/{module.TEST_RESULTS.name}"]
        assert card["test"]["protocols"] == json.loads(module.TEST_RESULTS.read_text())["protocols"]
