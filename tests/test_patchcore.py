"""PatchCore: coreset, nearest-neighbour wrapper, scoring properties, determinism, files, bad input."""
import csv
import dataclasses
import json
import threading
import time

import numpy as np
import pytest
import torch

import backbones
import data
import patchcore
import splits
from conftest import truncated_copy

CPU = torch.device("cpu")


def settings(size=64, ratio=0.1, backbone="efficientnet_lite0", weights="imagenet", seed=0, reweight=False):
    return patchcore.Settings(backbone, weights, backbones.default_layers(backbone), size, None, 3, 1024, 1024,
                              ratio, reweight, 9, seed)


# ---- coreset -------------------------------------------------------------------------------------------------
def test_coreset_picks_the_farthest_point_first():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(200, 8, generator=g) * 0.1
    z[37] += 50  # one point far from everything else
    assert patchcore.greedy_coreset_fast(z, 0.01, seed=0)[0] == 37


def test_coreset_covers_every_cluster():
    g = torch.Generator().manual_seed(1)
    centres = torch.tensor([[0.0, 0], [10, 0], [0, 10], [10, 10]])
    z = (centres[:, None] + 0.1 * torch.randn(4, 25, 2, generator=g)).reshape(100, 2)  # 4 tight clusters
    chosen = patchcore.greedy_coreset_fast(z, 0.04, seed=0)  # 4 points
    assert sorted((chosen // 25).tolist()) == [0, 1, 2, 3]


def test_coreset_ratio_one_keeps_all_and_bad_ratios_raise():
    z = torch.randn(30, 4)
    assert patchcore.greedy_coreset_fast(z, 1.0, seed=0).tolist() == list(range(30))
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="coreset ratio must be in"):
            patchcore.greedy_coreset_fast(z, bad, seed=0)


def same_up_to_ties(fast: torch.Tensor, plain: torch.Tensor, z: torch.Tensor, seed: int, rtol: float = 1e-5) -> bool:
    """The same points in the same order, except where two points' distances to the chosen set tie to float32
    precision: the loops sum the d products with different BLAS kernels, so they may take the two in either order
    (an adjacent swap). Any other difference, or a swap of points that do not tie, is a real difference."""
    if len(fast) != len(plain):
        return False
    z64 = z.double()
    starts = torch.randperm(len(z), generator=torch.Generator().manual_seed(seed))[:patchcore.N_STARTS]
    start = torch.cdist(z64, z64[starts]).mean(1)  # (N,) the loops' starting distances, in float64
    p = 0
    while p < len(plain):
        if fast[p] == plain[p]:
            p += 1
            continue
        a, b = int(plain[p]), int(fast[p])
        if p + 1 == len(plain) or (int(fast[p + 1]), int(plain[p + 1])) != (a, b):
            return False
        dist = torch.minimum(start[[a, b]], torch.cdist(z64[[a, b]], z64[plain[:p]]).amin(1)) if p else start[[a, b]]
        if not torch.isclose(dist[0], dist[1], rtol=rtol):
            return False
        p += 2
    return True


def test_same_up_to_ties_accepts_a_swapped_tie_and_nothing_else():
    z = torch.tensor([[0.0, 0.0], [10.0, 0.0], [-10.0, 0.0], [0.0, 3.0]])  # 1 and 2 start at the same distance
    plain = patchcore.greedy_coreset(z, 0.75, seed=0)
    assert plain.tolist() == [1, 2, 3]  # the tie goes to the lower index
    assert same_up_to_ties(torch.tensor([2, 1, 3]), plain, z, seed=0)  # ... but either order is right
    assert not same_up_to_ties(torch.tensor([1, 3, 2]), plain, z, seed=0)  # 3 is nearer than 2: not a tie
    assert not same_up_to_ties(torch.tensor([1, 2, 0]), plain, z, seed=0)  # another point


@pytest.mark.parametrize("top", [1, 7, 64, patchcore.TOP_CANDIDATES])
def test_fast_coreset_selects_what_the_plain_loop_selects_on_clustered_data(top):
    g = torch.Generator().manual_seed(4)
    centres = 5 * torch.randn(12, 32, generator=g)
    z = (centres[torch.randint(0, 12, (3000,), generator=g)] + torch.randn(3000, 32, generator=g))  # (3000, 32)
    plain = patchcore.greedy_coreset(z, 0.1, seed=0)
    fast = patchcore.greedy_coreset_fast(z, 0.1, seed=0, top=top)  # small top: many short blocks
    assert len(fast) == 300 and same_up_to_ties(fast, plain, z, seed=0)


def test_fast_coreset_selects_what_the_plain_loop_selects_on_real_features(synth_root):
    train, _ = data.load_category(synth_root, "washer")
    _, z = patchcore.extract_features(train, settings(), CPU, 8)  # (16 * 64, 128) Lite0 patch projections
    for ratio, top in ((0.25, 64), (0.5, patchcore.TOP_CANDIDATES)):
        plain = patchcore.greedy_coreset(z, ratio, seed=1)
        fast = patchcore.greedy_coreset_fast(z, ratio, seed=1, top=top)
        assert len(fast) == int(len(z) * ratio) and same_up_to_ties(fast, plain, z, seed=1)


def test_the_block_bound_no_point_outside_the_top_can_be_chosen():
    g = torch.Generator().manual_seed(5)
    z = torch.randn(2000, 16, generator=g)
    _, min_dist, sq = patchcore.coreset_start(z, 0.1, 0, patchcore.N_STARTS)
    for _ in range(20):  # a few plain steps, so that min_dist is no longer the starting guess
        j = torch.argmax(min_dist, 0, keepdim=True)
        torch.minimum(min_dist, patchcore.distances_to(z, sq, z[j][0], sq[j]), out=min_dist)
    cand, theta = patchcore.top_candidates(min_dist, 100)
    outside = torch.ones(len(z), dtype=torch.bool)
    outside[cand] = False
    assert torch.equal(cand, cand.sort().values) and len(cand) == 100
    assert min_dist[outside].max() == theta and min_dist[cand].min() >= theta
    # The plain loop, run on from here, chooses inside the candidates for as long as one of them is beyond theta ...
    first = torch.argmax(min_dist, 0, keepdim=True)
    block = patchcore.greedy_within(z, sq, min_dist, cand, theta, first, budget=len(z))
    plain = []
    while not plain or min_dist[cand].max() > theta:
        j = torch.argmax(min_dist, 0, keepdim=True)
        assert not outside[j], "the plain loop chose a point the bound excluded"
        plain.append(int(j))
        torch.minimum(min_dist, patchcore.distances_to(z, sq, z[j][0], sq[j]), out=min_dist)
    # ... and greedy_within, which sees only the candidates, returns exactly those choices
    assert len(plain) > 10 and block.tolist() == plain


def test_coreset_is_seeded():
    z = torch.randn(500, 16, generator=torch.Generator().manual_seed(2))
    a, b = patchcore.greedy_coreset_fast(z, 0.05, seed=3), patchcore.greedy_coreset_fast(z, 0.05, seed=3)
    assert torch.equal(a, b) and len(a) == 25 and len(set(a.tolist())) == 25


# ---- nearest-neighbour wrapper -------------------------------------------------------------------------------
def test_nearest_neighbours_true_l2_save_load(tmp_path):
    nn = patchcore.NearestNeighbours(np.array([[0.0, 0.0], [3.0, 4.0], [6.0, 8.0]]), CPU)
    dist, idx = nn.search(np.array([[0.0, 0.0], [3.6, 4.8]]), 2)
    np.testing.assert_allclose(dist, [[0, 5], [1, 4]], atol=1e-5)  # not squared
    assert idx.tolist() == [[0, 1], [1, 2]]
    np.testing.assert_allclose(nn.vectors(np.array([2])), [[6, 8]])
    nn.save(tmp_path / "index.faiss")
    again = patchcore.NearestNeighbours.load(tmp_path / "index.faiss", CPU)
    assert np.array_equal(again.search(np.array([[1.0, 1.0]]), 3)[0], nn.search(np.array([[1.0, 1.0]]), 3)[0])
    with pytest.raises(ValueError, match="larger than the memory bank"):
        nn.search(np.zeros((1, 2)), 4)


@pytest.mark.parametrize("k", [1, 5])
def test_torch_exact_search_finds_faiss_flat_neighbours_across_blocks(clustered, monkeypatch, k):
    """Issue 35: the torch matrix-product search (the default exact engine) returns FAISS IndexFlatL2's neighbours
    and distances to float32 rounding, also when the bank and the queries are cut into many blocks."""
    bank, queries, gap = clustered  # (4000, 64), (2000, 64), (2000,)
    monkeypatch.setattr(patchcore, "SEARCH_ROWS", 300)  # 7 query blocks, the last one short
    monkeypatch.setattr(patchcore, "SEARCH_BLOCK", 300 * 700)  # 700 bank rows per block: 6 blocks, the last short
    ours = patchcore.NearestNeighbours(bank, CPU)
    flat = patchcore.NearestNeighbours(bank, CPU, engine="faiss")
    assert (ours.engine, flat.engine) == ("torch-cpu", "faiss-cpu")
    (d, i), (fd, fi) = ours.search(queries, k), flat.search(queries, k)
    assert d.shape == i.shape == (2000, k)
    clear = gap > 1e-4  # the nearest neighbour is not a float32 tie
    assert np.array_equal(i[clear, 0], fi[clear, 0]) and clear.mean() > 0.99
    np.testing.assert_allclose(d, fd, rtol=1e-5)  # the k nearest distances, in order
    assert (np.diff(d, axis=1) >= 0).all()
    b, q = bank.astype(np.float64), queries[:50].astype(np.float64)  # float64 truth for a few queries
    truth = np.sort(np.sqrt(((q[:, None] - b[None]) ** 2).sum(-1)), 1)[:, :k]  # (50, k)
    np.testing.assert_allclose(d[:50], truth, rtol=1e-5)
    assert ours.queries == 2000 and ours.gflops() > 0  # what metrics.json records of the search


def test_reweight_eq7_by_hand():
    bank = np.array([[0.0], [1.0], [2.0], [10.0]])
    nn = patchcore.NearestNeighbours(bank, CPU)
    # test patch at 0.5: m* = 0 (dist 0.5); N_b(m*) with b=2 is {0, 1}: distances 0.5, 0.5 -> weight 1/2
    assert patchcore.reweight(nn, np.array([0.5]), 0.5, 0, 2) == pytest.approx(0.25)
    # test patch at 12: m* = 10 (dist 2); N_2(10) = {10, 2}: distances 2 and 10 -> weight e^2 / (e^2 + e^10)
    w = np.exp(2) / (np.exp(2) + np.exp(10))
    assert patchcore.reweight(nn, np.array([12.0]), 2.0, 3, 2) == pytest.approx((1 - w) * 2)


# ---- IVF search (issue 16) -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def clustered():
    """20 well-separated Gaussian clusters in 64-d (centres ~34 apart, points ~8 from theirs): a bank (4000, 64),
    queries (2000, 64) and, in float64, each query's relative gap between its nearest and second-nearest bank row."""
    rng = np.random.default_rng(0)
    centres = 3 * rng.normal(size=(20, 64))
    bank = (centres[rng.integers(0, 20, 4000)] + rng.normal(size=(4000, 64))).astype(np.float32)
    queries = (centres[rng.integers(0, 20, 2000)] + rng.normal(size=(2000, 64))).astype(np.float32)
    b, q = bank.astype(np.float64), queries.astype(np.float64)
    d = np.sqrt(np.maximum((q * q).sum(1)[:, None] + (b * b).sum(1)[None] - 2 * q @ b.T, 0))  # (2000, 4000)
    two = np.sort(d, 1)[:, :2]  # (2000, 2)
    return bank, queries, (two[:, 1] - two[:, 0]) / two[:, 0]


def test_ivf_lists_from_the_bank_size():
    assert patchcore.ivf_lists(40000) == 800  # 4 sqrt(N) for a large bank
    assert patchcore.ivf_lists(4000) == 102 == 4000 // patchcore.POINTS_PER_LIST  # 4 sqrt(N) = 253: too few points
    assert patchcore.ivf_lists(77) == 1  # too small for an IVF index (see test_ivf_bad_nprobe_and_too_small_bank)


def test_ivf_probing_every_list_finds_the_exact_neighbours(clustered):
    bank, queries, gap = clustered
    exact = patchcore.NearestNeighbours(bank, CPU)
    ivf = patchcore.NearestNeighbours(bank, CPU, "ivf", seed=0)
    assert (exact.kind, ivf.kind, ivf.n_lists) == ("exact", "ivf", 102)
    ivf.set_nprobe(ivf.n_lists)
    (d, i), (de, ie) = ivf.search(queries, 3), exact.search(queries, 3)
    # IndexFlatL2 computes |q|^2 + |m|^2 - 2<q, m> (BLAS), IVF sums squared differences: the same distances up to
    # float32 rounding (here < 1e-5 relative), so only a query whose two nearest rows tie that closely may differ.
    np.testing.assert_allclose(d, de, rtol=1e-4)
    tie = gap < 1e-4
    assert tie.mean() < 0.01 and np.array_equal(i[~tie, 0], ie[~tie, 0])
    # Eq. 7 through the IVF index (its rows reconstructed from the lists) gives exact search's reweighted score
    for j in range(5):
        args = (queries[j], float(de[j, 0]), int(ie[j, 0]), 9)
        assert patchcore.reweight(ivf, *args) == pytest.approx(patchcore.reweight(exact, *args), rel=1e-4)


def test_ivf_default_nprobe_finds_nearly_every_exact_neighbour_and_is_seeded(clustered):
    bank, queries, _ = clustered
    _, exact = patchcore.NearestNeighbours(bank, CPU).search(queries, 1)
    ivf = patchcore.NearestNeighbours(bank, CPU, "ivf", seed=0)
    assert ivf.cpu.nprobe == patchcore.NPROBE == 32
    found = (ivf.search(queries, 1)[1] == exact).mean()
    ivf.set_nprobe(1)
    assert found >= 0.99 and (ivf.search(queries, 1)[1] == exact).mean() < found  # nprobe is what is searched
    centroids = lambda nn: nn.cpu.quantizer.reconstruct_n(0, nn.n_lists)  # (lists, 64) of the seeded k-means
    same, other = (patchcore.NearestNeighbours(bank, CPU, "ivf", seed=s) for s in (0, 1))
    assert np.array_equal(centroids(same), centroids(ivf)) and not np.array_equal(centroids(other), centroids(ivf))


def test_ivf_save_load_keeps_kind_and_nprobe(clustered, tmp_path):
    bank, queries, _ = clustered
    s = dataclasses.replace(settings(), target_dim=64, search="ivf", nprobe=4)
    fitted = patchcore.MemoryBank(s, patchcore.NearestNeighbours(bank, CPU, "ivf", 4, seed=0))
    fitted.save(tmp_path / "bank")
    loaded = patchcore.MemoryBank.load(tmp_path / "bank", CPU)
    assert loaded.settings == s and (loaded.nn.kind, loaded.nn.cpu.nprobe) == ("ivf", 4)
    assert all(np.array_equal(a, b) for a, b in zip(loaded.nn.search(queries, 2), fitted.nn.search(queries, 2)))
    assert np.array_equal(loaded.nn.vectors(np.array([7, 3999])), bank[[7, 3999]])  # rows back from the lists
    assert patchcore.NearestNeighbours.load(tmp_path / "bank" / "index.faiss", CPU).cpu.nprobe == 4  # in the file too
    again = patchcore.MemoryBank.load(tmp_path / "bank", CPU, nprobe=2)  # nprobe may change without retraining
    assert again.settings.nprobe == again.nn.cpu.nprobe == 2
    # A bank saved before issue 16 (no search, no nprobe in settings.json) is an exact one
    raw = json.loads((tmp_path / "bank" / "settings.json").read_text())
    (tmp_path / "old").mkdir()
    patchcore.NearestNeighbours(bank, CPU).save(tmp_path / "old" / "index.faiss")
    data.write_json(tmp_path / "old" / "settings.json", {k: v for k, v in raw.items() if k not in ("search", "nprobe")})
    old = patchcore.MemoryBank.load(tmp_path / "old", CPU)
    assert (old.settings.search, old.settings.nprobe, old.nn.kind) == ("exact", None, "exact")
    with pytest.raises(data.DataError, match="--nprobe applies to IVF search only, and the memory bank in .*old is"):
        patchcore.MemoryBank.load(tmp_path / "old", CPU, nprobe=2)  # an exact search would ignore it


def test_ivf_bad_nprobe_and_too_small_bank(clustered):
    bank, _, _ = clustered
    ivf = patchcore.NearestNeighbours(bank, CPU, "ivf", seed=0)
    for bad in (0, ivf.n_lists + 1):
        with pytest.raises(data.DataError, match=f"--nprobe must be between 1 and the 102 IVF lists .*got {bad}$"):
            ivf.set_nprobe(bad)
    with pytest.raises(data.DataError, match="--nprobe must be between 1 and the 102"):
        patchcore.NearestNeighbours(bank, CPU, "ivf", nprobe=103, seed=0)
    # Too small to train two lists: one sentence, no silent fallback to exact search (see patchcore.ivf_index)
    with pytest.raises(data.DataError, match="at least 78 patches to train its lists, this one has 77; use --search"):
        patchcore.NearestNeighbours(bank[:77], CPU, "ivf")
    # A bank with fewer lists than the default nprobe: every list is searched (an explicit larger nprobe raises)
    assert patchcore.NearestNeighbours(bank[:500], CPU, "ivf").cpu.nprobe == patchcore.ivf_lists(500) == 12
    small = patchcore.NearestNeighbours(bank[:78], CPU, "ivf", nprobe=1)
    assert small.n_lists == 2 and small.search(bank[:5], 1)[1][:, 0].tolist() == [0, 1, 2, 3, 4]
    # One list of two cannot hold all 78 rows: FAISS would pad with -1, the wrapper says so instead
    with pytest.raises(data.DataError, match="with nprobe=1 the IVF lists searched hold fewer than k=78 patches"):
        small.search(bank[:1], 78)
    with pytest.raises(ValueError, match="nprobe applies to an ivf index only"):
        patchcore.NearestNeighbours(bank, CPU).set_nprobe(2)


# ---- prefetching the next batch (issue 16) ---------------------------------------------------------------------
def test_prefetched_keeps_order_raises_in_place_and_stops_early():
    assert list(patchcore.prefetched(range(50))) == list(range(50))
    assert list(patchcore.prefetched([None, 0, None])) == [None, 0, None]  # no item is taken for the end

    def broken():
        yield from (0, 1, 2)
        raise data.DataError("cannot read image 3.png")
    got = []
    with pytest.raises(data.DataError, match="3.png"):
        for x in patchcore.prefetched(broken()):
            got.append(x)
    assert got == [0, 1, 2]
    items = patchcore.prefetched(iter(range(10 ** 9)))
    assert next(items) == 0
    items.close()  # the caller stops early: the reading thread ends too
    assert not any(t.name == "prefetch" for t in threading.enumerate())


def test_prefetching_does_not_change_scores(synth_root, monkeypatch):
    train, test = data.load_category(synth_root, "washer")
    bank = patchcore.fit(train[:4], settings(ratio=0.5), CPU, 4)
    t0, laps = time.perf_counter(), patchcore.Laps()
    scores, maps, masks = patchcore.score(bank, test, CPU, 3, laps=laps)
    elapsed = time.perf_counter() - t0
    # the laps split the call's time into its phases: each counted once, all inside the call
    assert set(laps.seconds) == {"read", "features", "search", "maps"} and min(laps.seconds.values()) > 0
    assert sum(laps.seconds.values()) <= elapsed
    monkeypatch.setattr(patchcore, "prefetched", iter)  # the plain loop over the loader
    plain = patchcore.score(bank, test, CPU, 3)
    assert np.array_equal(plain[0], scores) and np.array_equal(plain[1], maps) and np.array_equal(plain[2], masks)


# ---- features ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backbone,weights", [("efficientnet_lite0", "imagenet"), ("wide_resnet50_2", "none")])
def test_embed_shape_is_stride_8_grid(backbone, weights):
    s = settings(backbone=backbone, weights=weights)
    extractor = backbones.feature_extractor(backbone, weights, s.layers)
    f, grid = patchcore.embed(extractor, torch.randn(2, 3, 64, 64), s)
    assert grid == (8, 8) and f.shape == (2, 64, 1024)


@pytest.mark.parametrize("channels,patch,pretrain,target", [((40, 112), 3, 1024, 1024), ((5, 11, 3), 3, 120, 64),
                                                             ((7, 2), 5, 200, 50)])
def test_aggregation_as_convolution_equals_the_papers_steps(channels, patch, pretrain, target):
    g = torch.Generator().manual_seed(6)
    s = patchcore.Settings("efficientnet_lite0", "none", ("a",) * len(channels), 64, None, patch, pretrain, target,
                           0.1, False, 9, 0)
    layers = [torch.randn(2, c, 16 // 2 ** i, 16 // 2 ** i, generator=g) for i, c in enumerate(channels)]
    kernels = patchcore.aggregation_kernels(channels, s)
    assert kernels is not None
    steps = patchcore.aggregate(layers, s)  # (2, 256, target) patchify -> resize -> pool -> stack -> pool
    conv = patchcore.aggregate_by_convolution(layers, kernels, s)
    assert conv.shape == steps.shape == (2, 256, target)
    torch.testing.assert_close(conv, steps, rtol=1e-5, atol=1e-6)


def test_wide_layers_keep_the_papers_steps():
    s = settings(backbone="wide_resnet50_2", weights="none")
    assert patchcore.aggregation_kernels((512, 1024), s) is None  # 512*9 > 1024: unfold + pool is cheaper


# ---- scoring properties --------------------------------------------------------------------------------------
def test_training_image_scores_zero_against_its_own_patches(synth_root):
    train, _ = data.load_category(synth_root, "weave")
    bank = patchcore.fit(train[:1], settings(ratio=1.0), CPU, 4)
    scores, maps, _ = patchcore.score(bank, train[:2], CPU, 4)
    assert len(bank.nn) == 64  # 8 x 8 patches of one 64 px image, all kept
    assert scores[0] < 0.01 * scores[1]  # itself: ~0 (float16 storage); another normal image: clearly not
    assert maps.shape == (2, 64, 64)


@pytest.fixture(scope="module")
def fitted_128(synth_root_128):
    """Lite0 memory banks of both synthetic categories at 128 px, and their test scores."""
    out = {}
    for category in ("weave", "washer"):
        train, test = data.load_category(synth_root_128, category)
        bank = patchcore.fit(train, settings(size=128), CPU, 8)
        out[category] = (bank, test, *patchcore.score(bank, test, CPU, 8))
    return out


@pytest.mark.parametrize("category", ["weave", "washer"])
def test_defects_score_higher_and_maps_peak_in_the_mask(fitted_128, category):
    from metrics import image_auroc
    from scipy.ndimage import binary_dilation
    _, test, scores, maps, masks = fitted_128[category]
    labels = np.array([s.label for s in test])
    assert image_auroc(labels, scores) >= 0.9
    hits = []
    for i in np.flatnonzero(labels):
        peak = np.unravel_index(maps[i].argmax(), maps[i].shape)
        hits.append(binary_dilation(masks[i], iterations=4)[peak])  # within 4 px of the defect
    assert np.mean(hits) >= 0.9


def test_batch_size_seed_and_save_load_do_not_change_scores(fitted_128, synth_root_128, tmp_path):
    bank, test, scores, maps, _ = fitted_128["weave"]
    # Batch size 1 vs 8: the same up to float32 rounding (CPU kernels may sum in another order for another batch
    # shape), tight enough that a patch or a mask taken from the wrong image of the batch would still fail.
    one, maps_one, _ = patchcore.score(bank, test, CPU, 1)
    np.testing.assert_allclose(one, scores, rtol=1e-5)
    np.testing.assert_allclose(maps_one, maps, rtol=1e-5, atol=1e-5 * maps.max())
    # The same seed in the same process: the same memory bank, hence the same scores
    train, _ = data.load_category(synth_root_128, "weave")
    refit = patchcore.fit(train, settings(size=128), CPU, 8)
    assert np.array_equal(refit.nn.vectors(np.arange(len(refit.nn))), bank.nn.vectors(np.arange(len(bank.nn))))
    assert np.array_equal(patchcore.score(refit, test, CPU, 8)[0], scores)
    bank.save(tmp_path / "bank")
    loaded = patchcore.MemoryBank.load(tmp_path / "bank", CPU)
    assert loaded.settings == bank.settings
    assert np.array_equal(patchcore.score(loaded, test, CPU, 8)[0], scores)


# ---- the script: files, split, --load, bad input ---------------------------------------------------------------
def test_main_writes_results_and_load_reuses_the_bank(synth_root, tmp_path):
    _, test = data.load_category(synth_root, "washer")
    split = splits.make_split(test, "washer", 0, "all-types", None)
    splits.write_split(split, tmp_path / "split.json")
    out = tmp_path / "run"
    args = ["--data-root", str(synth_root), "--category", "washer", "--backbone", "efficientnet_lite0",
            "--image-size", "64", "--split", str(tmp_path / "split.json"), "--out-dir", str(out)]
    m = patchcore.main(args + ["--save-maps", "3"])
    with open(out / "scores.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["path"] for r in rows] == split["eval"]  # relative to the category folder
    saved = json.loads((out / "metrics.json").read_text())
    for key in ("image_auroc", "pixel_auroc", "aupro", "f1_max", "fit_seconds", "ms_per_image", "peak_rss_mb",
                "memory_bank_size", "args", "threshold", "recall_at_threshold"):
        assert key in saved
    assert saved["image_auroc"] == m["image_auroc"] and saved["threshold"] is not None
    assert sum(saved["ms_per_image_by_phase"].values()) <= saved["ms_per_image"]  # phases of the timed scoring
    fit_phases = saved["fit_seconds_by_phase"]
    assert list(fit_phases) == ["features", "coreset", "index"] and min(fit_phases.values()) > 0
    assert sum(fit_phases.values()) <= saved["fit_seconds"]  # phases of the timed fit
    assert len(list((out / "maps").glob("*.png"))) == 3
    assert (out / "memory_bank" / "index.faiss").is_file()
    ran_on = "cpu" if backbones.cuda_problem() else "cuda:0"  # what --device auto chose, with the GPU's index
    assert saved["device_info"]["device"] == ran_on and saved["device_info"]["torch"] == torch.__version__
    assert saved["device_info"]["faiss_gpu"] is (ran_on != "cpu" and patchcore.faiss.get_num_gpus() > 0)
    assert saved["args"]["precision"] == "mixed" and saved["args"]["workers"] == data.default_workers()
    # --load: the bank brings backbone and image size (giving them ends the run, see test_load_refuses_...)
    load = args[:4] + args[8:-2] + ["--out-dir", str(tmp_path / "again"), "--load", str(out)]
    again = patchcore.main(load)
    with open(tmp_path / "again" / "scores.csv") as f:
        assert [r["score"] for r in csv.DictReader(f)] == [r["score"] for r in rows]
    assert again["image_auroc"] == m["image_auroc"]


def test_main_ivf_records_the_search_and_scores_as_exact_search_does(synth_root, tmp_path):
    base = ["--data-root", str(synth_root), "--category", "washer", "--backbone", "efficientnet_lite0",
            "--image-size", "64", "--coreset-ratio", "0.5"]  # 14 images (2 held out) x 64 patches / 2: 448, 11 lists
    exact = patchcore.main(base + ["--out-dir", str(tmp_path / "exact")])
    ivf = patchcore.main(base + ["--search", "ivf", "--out-dir", str(tmp_path / "ivf")])
    saved = json.loads((tmp_path / "ivf" / "metrics.json").read_text())
    # The default nprobe (32) is more than this bank's 11 lists: every list is searched, and settings say so
    assert (saved["settings"]["search"], saved["settings"]["nprobe"], saved["ivf_lists"]) == ("ivf", 11, 11)
    assert (exact["settings"]["search"], exact["settings"]["nprobe"], exact["ivf_lists"]) == ("exact", None, None)
    scores = {}
    for name in ("exact", "ivf"):
        with open(tmp_path / name / "scores.csv") as f:
            scores[name] = np.array([float(r["score"]) for r in csv.DictReader(f)])
    # Where IVF finds each image's worst patch's exact neighbour, only float32 rounding separates the two (IndexFlatL2:
    # |q|^2 + |m|^2 - 2<q, m>, IVF: a sum of squared differences; ~2e-6 relative here); a missed neighbour would be
    # another bank row, farther by far more than 1e-4 on these features.
    np.testing.assert_allclose(scores["ivf"], scores["exact"], rtol=1e-4)
    assert ivf["image_auroc"] == exact["image_auroc"]
    # --load keeps the saved IVF index; --nprobe may change its nprobe (no retraining)
    again = patchcore.main(base[:4] + ["--load", str(tmp_path / "ivf"), "--nprobe", "4", "--out-dir", str(tmp_path / "a")])
    assert (again["settings"]["search"], again["settings"]["nprobe"], again["ivf_lists"]) == ("ivf", 4, 11)
    # Bad input: one sentence, no out dir (nprobe's upper bound and the bank's size are known after fitting only)
    bad = ["--search", "ivf", "--out-dir", str(tmp_path / "bad")]
    with pytest.raises(SystemExit, match="--nprobe must be at least 1, got 0$"):
        patchcore.main(base + bad + ["--nprobe", "0"])
    with pytest.raises(SystemExit, match="--nprobe must be between 1 and the 11 IVF lists of this 448-patch memory"):
        patchcore.main(base + bad + ["--nprobe", "12"])
    with pytest.raises(SystemExit, match="needs a memory bank of at least 78 patches .* has 44; use --search exact"):
        patchcore.main(base[:-1] + ["0.05"] + bad)
    assert not (tmp_path / "bad").exists() and list(tmp_path.glob(".bad*")) == []


def test_engines_score_alike_and_the_run_records_the_search(synth_root, tmp_path):
    """--engine faiss (FAISS's flat index) and the default torch products give the same scores to float32 rounding;
    metrics.json names what searched and at how many GFLOP/s (issue 35); --engine with IVF search is refused."""
    base = ["--data-root", str(synth_root), "--category", "washer", "--backbone", "efficientnet_lite0",
            "--image-size", "64", "--coreset-ratio", "0.5"]
    torch_run = patchcore.main(base + ["--out-dir", str(tmp_path / "torch")])
    faiss_run = patchcore.main(base + ["--engine", "faiss", "--out-dir", str(tmp_path / "faiss")])
    np.testing.assert_allclose(read_score_column(tmp_path / "torch"), read_score_column(tmp_path / "faiss"), rtol=1e-5)
    assert torch_run["image_auroc"] == pytest.approx(faiss_run["image_auroc"], abs=1e-9)
    saved = json.loads((tmp_path / "torch" / "metrics.json").read_text())
    assert (saved["search_engine"], saved["settings"]["engine"]) == ("torch-cpu", "torch")
    assert faiss_run["search_engine"] == "faiss-cpu" and saved["search_gflops"] > 0
    # --load may switch the engine of a saved bank: the same index, the same scores
    loaded = patchcore.main(["--data-root", str(synth_root), "--category", "washer", "--load", str(tmp_path / "torch"),
                             "--engine", "faiss", "--out-dir", str(tmp_path / "loaded")])
    assert loaded["search_engine"] == "faiss-cpu"
    np.testing.assert_allclose(read_score_column(tmp_path / "loaded"), read_score_column(tmp_path / "torch"), rtol=1e-5)
    with pytest.raises(SystemExit, match="--engine applies to --search exact only"):
        patchcore.main(base + ["--search", "ivf", "--engine", "faiss", "--out-dir", str(tmp_path / "bad")])
    assert not (tmp_path / "bad").exists()


def read_score_column(run_dir):
    with open(run_dir / "scores.csv") as f:
        return np.array([float(r["score"]) for r in csv.DictReader(f)])


def test_load_with_search_rebuilds_the_index_so_exact_and_ivf_compare_on_one_bank(synth_root, tmp_path):
    base = ["--data-root", str(synth_root), "--category", "washer"]
    fit = base + ["--backbone", "efficientnet_lite0", "--image-size", "64", "--coreset-ratio", "0.5"]  # 448 patches
    exact = patchcore.main(fit + ["--out-dir", str(tmp_path / "exact")])
    patchcore.main(fit + ["--search", "ivf", "--out-dir", str(tmp_path / "ivf")])
    banks = {name: patchcore.MemoryBank.load(tmp_path / name, CPU).nn for name in ("exact", "ivf")}
    rows = {name: nn.vectors(np.arange(len(nn))) for name, nn in banks.items()}
    assert np.array_equal(rows["exact"], rows["ivf"])  # one seeded coreset, saved in two kinds of index
    # The exact bank with --search ivf: IVF lists of its rows, the seeded k-means a fit with --search ivf builds
    as_ivf = patchcore.main(base + ["--load", str(tmp_path / "exact"), "--search", "ivf",
                                    "--out-dir", str(tmp_path / "as-ivf")])
    saved = json.loads((tmp_path / "as-ivf" / "metrics.json").read_text())
    assert (saved["settings"]["search"], saved["settings"]["nprobe"], saved["ivf_lists"]) == ("ivf", 11, 11)
    assert (saved["args"]["search"], saved["args"]["nprobe"]) == ("ivf", 11)  # what ran, not the parser's None
    ran = patchcore.MemoryBank.load(tmp_path / "as-ivf", CPU).nn  # the index that ran, saved with the run
    centroids = lambda nn: nn.cpu.quantizer.reconstruct_n(0, nn.n_lists)  # (11, 1024)
    assert ran.kind == "ivf" and np.array_equal(centroids(ran), centroids(banks["ivf"]))
    # All 11 lists probed: exact search's scores up to float32 rounding (see test_main_ivf_records_...)
    np.testing.assert_allclose(read_score_column(tmp_path / "as-ivf"), read_score_column(tmp_path / "ivf"), rtol=1e-6)
    np.testing.assert_allclose(read_score_column(tmp_path / "as-ivf"), read_score_column(tmp_path / "exact"), rtol=1e-4)
    assert as_ivf["image_auroc"] == pytest.approx(exact["image_auroc"], abs=1e-9)
    # The IVF bank with --search exact: a flat index of its rows scores as a fresh exact search of the same bank
    as_exact = patchcore.main(base + ["--load", str(tmp_path / "ivf"), "--search", "exact",
                                      "--out-dir", str(tmp_path / "as-exact")])
    assert (as_exact["settings"]["search"], as_exact["settings"]["nprobe"], as_exact["ivf_lists"]) == ("exact", None, None)
    assert (as_exact["args"]["search"], as_exact["args"]["nprobe"]) == ("exact", None)
    assert patchcore.MemoryBank.load(tmp_path / "as-exact", CPU).nn.kind == "exact"
    np.testing.assert_allclose(read_score_column(tmp_path / "as-exact"), read_score_column(tmp_path / "exact"),
                               rtol=1e-6)
    # --nprobe where the search is exact would be ignored: one sentence, no out dir
    bad = ["--nprobe", "4", "--out-dir", str(tmp_path / "bad")]
    with pytest.raises(SystemExit, match="--nprobe applies to IVF search only, and the memory bank in .* exactly here"):
        patchcore.main(base + ["--load", str(tmp_path / "ivf"), "--search", "exact"] + bad)
    with pytest.raises(SystemExit, match="--nprobe applies to IVF search only, and the memory bank in .* exactly here"):
        patchcore.main(base + ["--load", str(tmp_path / "exact")] + bad)  # no --search: the bank's, exact
    with pytest.raises(SystemExit, match="^error: --nprobe applies to --search ivf only; exact search probes no lists$"):
        patchcore.main(fit + bad)
    assert not (tmp_path / "bad").exists() and list(tmp_path.glob(".bad*")) == []


def test_load_refuses_flags_its_bank_fixes_and_records_the_banks_settings(synth_root, tmp_path):
    # Every setting of a bank is either fixed by it or set by a flag at --load: a new Settings field must be sorted
    fixed, at_load = set(patchcore.FIXED_BY_BANK), set(patchcore.SET_AT_LOAD)
    assert not fixed & at_load and fixed | at_load == {f.name for f in dataclasses.fields(patchcore.Settings)}
    base = ["--data-root", str(synth_root), "--category", "weave"]
    patchcore.main(base + ["--backbone", "efficientnet_lite0", "--image-size", "64", "--out-dir", str(tmp_path / "fit")])
    load = base + ["--load", str(tmp_path / "fit")]
    bad = ["--out-dir", str(tmp_path / "bad")]
    with pytest.raises(SystemExit, match=r"^error: --backbone cannot be given with --load: the memory bank in .*fit "
                                         r"fixes it \(fit a new bank instead\)$"):
        patchcore.main(load + bad + ["--backbone", "resnet18"])
    # Given at all counts, even with the bank's own value or abbreviated (argparse's --image for --image-size)
    with pytest.raises(SystemExit, match=r"^error: --image-size, --seed cannot be given with --load: .* fixes them"):
        patchcore.main(load + bad + ["--seed", "0", "--image", "64"])
    with pytest.raises(SystemExit, match="--reweight-k applies with --reweight only, and the memory bank in .*fit was"):
        patchcore.main(load + bad + ["--reweight-k", "3"])  # fitted without Eq. 7: k would be ignored
    with pytest.raises(SystemExit, match="^error: --reweight-k applies with --reweight only"):
        patchcore.main(base + ["--image-size", "64", "--reweight-k", "3"] + bad)
    assert not (tmp_path / "bad").exists() and list(tmp_path.glob(".bad*")) == []
    # A --load run records the bank's settings as its args, not the parser's defaults (wide_resnet50_2, 512 px)
    patchcore.main(load + ["--out-dir", str(tmp_path / "again")])
    args = json.loads((tmp_path / "again" / "metrics.json").read_text())["args"]
    assert (args["backbone"], args["image_size"], args["layers"], args["search"], args["coreset_ratio"]) == \
        ("efficientnet_lite0", 64, list(backbones.default_layers("efficientnet_lite0")), "exact", 0.1)
    assert args["explicit"] == ["category", "data_root", "load", "out_dir"]
    # Eq. 7 acts at scoring time, so --reweight acts on a loaded bank: every score becomes (1 - w) s*, 0 < w < 1
    # (w is often below float precision here: these distances are ~100 and differ by tens, so exp(d* - d) vanishes)
    weighted = patchcore.main(load + ["--reweight", "--reweight-k", "3", "--out-dir", str(tmp_path / "eq7")])
    assert (weighted["settings"]["reweight"], weighted["settings"]["reweight_k"], weighted["args"]["reweight_k"]) == \
        (True, 3, 3)
    eq7, plain = read_score_column(tmp_path / "eq7"), read_score_column(tmp_path / "again")
    assert np.all(eq7 <= plain) and (eq7 < plain).sum() >= 3


def test_bad_inputs_exit_with_one_sentence_and_no_out_dir(synth_root, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    base = ["--backbone", "efficientnet_lite0", "--image-size", "64", "--out-dir", str(out)]
    with pytest.raises(SystemExit, match="does not exist"):
        patchcore.main(["--data-root", str(tmp_path / "nope"), "--category", "weave"] + base)
    with pytest.raises(SystemExit, match="categories found: washer, weave"):
        patchcore.main(["--data-root", str(synth_root), "--category", "wave"] + base)
    with pytest.raises(SystemExit, match="coreset-ratio must be in"):
        patchcore.main(["--data-root", str(synth_root), "--category", "weave", "--coreset-ratio", "0"] + base)
    broken = truncated_copy(synth_root, "weave", "test/hole/001.png", tmp_path / "broken")

    def no_fit(*args, **kwargs):
        raise AssertionError("fitting started although a test image is unreadable")
    monkeypatch.setattr(patchcore, "fit", no_fit)  # the bad test image must be found before any fitting
    with pytest.raises(SystemExit, match="cannot read image .*001.png"):
        patchcore.main(["--data-root", str(broken), "--category", "weave"] + base)
    assert not out.exists() and list(tmp_path.glob(".out*")) == []  # no partial results, no temp folder left
