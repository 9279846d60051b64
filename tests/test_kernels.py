"""The compiled EM vote reads (capsnet.ops.kernels) against the eager reads they replace.

Every map is checked against :class:`capsnet.routing._em_votes.VoteReader` in float64 on the same
factors, for dense factors, grouped children with offsets (the class layer) and 4x4 matrices
(the convolutional layers); then whole routing and a whole model, compiled against eager; then
every fallback (kernels off, float64, a compiler that fails, is missing or hangs), the build
lock and the command line's reading of the environment. Tests that compile are skipped where
there is no C compiler; the fallbacks run everywhere.
"""

from __future__ import annotations

import shutil
import sys

import pytest
import torch

import capsnet.ops.kernels as kernels
from capsnet import create_model
from capsnet.cli import kernel_settings
from capsnet.functional import spread_loss
from capsnet.layers.matrix import _block_weight
from capsnet.routing._em_votes import Term, VoteReader, factored_centre
from capsnet.routing.em import ConvGeometry, FactoredVotes, em_routing, to_patches

needs_cc = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler: the kernels cannot be built")

F32, F64 = torch.float32, torch.float64


@pytest.fixture(autouse=True)
def _follow_settings():
    kernels.set_enabled(None)
    yield
    kernels.set_enabled(None)


@pytest.fixture
def configure(monkeypatch):
    """:func:`kernels.configure` for one test: the settings and build state are restored after it."""
    for name in ("_settings", "_library", "_failed", "_private"):
        monkeypatch.setattr(kernels, name, getattr(kernels, name))
    return kernels.configure


@needs_cc
def test_kernels_build_here():
    assert kernels.enabled()
    assert kernels._load() is not None, kernels._failed


def _factors(kind: str, seed: int = 0):
    """``(poses, transforms, offsets, matrices, shape)`` in float64. A number after the kind is the
    number of parent types (default 3): 8 and 16 take the kernels with the lanes over types."""
    gen = torch.Generator().manual_seed(seed)
    types = int(kind.lstrip("adecnlosv") or 3)
    kind = kind.rstrip("0123456789")
    if kind == "dense":  # P = 5, D = 4: no 4x4 structure
        slots, batch, patches, types, dim, p, groups = 6, 2, 3, 3, 4, 5, 6
        matrices = None
    else:  # 4x4 poses, per child slot ("conv") or shared by 4 children with offsets ("class")
        slots, batch, patches, dim, p = 8, 3, (5 if kind == "conv" else 1), 16, 16
        groups = slots if kind == "conv" else 2
        matrices = torch.randn(groups, types, 4, 4, generator=gen, dtype=F64)
    per_group = slots // groups
    poses = torch.randn(groups, per_group * batch * patches, p, generator=gen, dtype=F64)
    transforms = torch.randn(groups, p, types * dim, generator=gen, dtype=F64) if matrices is None else _block_weight(matrices)
    offsets = torch.randn(slots, dim, generator=gen, dtype=F64) if kind == "class" else None
    return poses, transforms, offsets, matrices, (slots, batch, patches, types, dim)


def _readers(kind: str):
    poses, transforms, offsets, matrices, shape = _factors(kind)
    centre = factored_centre(poses, transforms, offsets, shape)
    eager = VoteReader(shape, factors=FactoredVotes(poses, transforms, offsets), centre=centre)
    assert eager.compiled is None  # float64: the eager path
    f32 = [None if t is None else t.float() for t in (poses, transforms, offsets, matrices, centre)]
    compiled = kernels.em_votes(*f32, shape)
    assert compiled is not None
    assert (compiled.votes.matrices is not None) == (matrices is not None)
    return eager, compiled, shape


@needs_cc
@pytest.mark.parametrize("kind", ["dense", "conv", "class", "conv8", "conv16", "class16", "conv24"])
def test_moments_and_quadratic_match_the_eager_reads(kind):
    eager, compiled, (slots, batch, patches, types, dim) = _readers(kind)
    gen = torch.Generator().manual_seed(1)
    n = batch * patches * types
    r = torch.rand(slots, n, generator=gen, dtype=F64)
    u1, u2, u0 = torch.randn(n, dim, generator=gen, dtype=F64), -torch.rand(n, dim, generator=gen, dtype=F64), torch.randn(n, generator=gen, dtype=F64)
    for got, want in zip(compiled.moments(r.float()), eager.moments(r)):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(compiled.quadratic(u1.float(), u2.float(), u0.float()).double(), eager.quadratic(u1, u2, u0),
                               rtol=1e-5, atol=1e-3)  # fmt: skip
    lanes = {"conv8": 8, "conv16": kernels._load().capsnet_type_lanes(), "class16": kernels._load().capsnet_type_lanes(),
             "conv24": 8}.get(kind)
    assert compiled.lanes == lanes  # the quadratic read with the lanes over types, where J allows it


@needs_cc
@pytest.mark.parametrize("kind", ["dense", "conv", "class"])
def test_gradient_chunks_match_the_eager_chunks(kind):
    eager, compiled, (slots, batch, patches, types, dim) = _readers(kind)
    gen = torch.Generator().manual_seed(2)
    n = batch * patches * types
    eager.terms = [Term(torch.randn(slots, n, generator=gen, dtype=F64), torch.randn(n, dim, generator=gen, dtype=F64),
                        torch.randn(n, dim, generator=gen, dtype=F64)) for _ in range(3)]  # fmt: skip
    want = torch.cat([g.clone() for _, g in eager.grad_chunks()])
    terms = [tuple(t.float().contiguous() for t in term) for term in eager.terms]
    got = torch.empty(slots, n, dim)
    for start in range(0, slots, 3):  # several children per call, and a short last call
        stop = min(start + 3, slots)
        compiled.gradient(terms, start, stop, got[start:stop])
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-3)


def _conv_problem(dtype=F32, seed=3, batch=2, types=3):
    """A ConvMatCaps-like routing problem: 4x4 poses, one transform per child slot (B 4 rows);
    ``types`` parent types (16: the reads with the lanes over types)."""
    geometry = ConvGeometry((5, 5), (3, 3), (2, 2), 2)
    gen = torch.Generator().manual_seed(seed)
    slots, patches = geometry.slots, geometry.num_patches
    poses = torch.randn(slots, batch * patches, 16, generator=gen, dtype=dtype)
    matrices = torch.randn(slots, types, 4, 4, generator=gen, dtype=dtype)
    act = to_patches(torch.rand(batch, 2, 5, 5, generator=gen, dtype=dtype), geometry)  # (B, 4, 18)
    beta_a, beta_v = torch.randn(types, generator=gen, dtype=dtype), torch.randn(types, generator=gen, dtype=dtype)
    return geometry, poses, matrices, act, beta_a, beta_v


def _route(flag, poses, matrices, act, beta_a, beta_v, geometry, **options):
    kernels.set_enabled(flag)
    p, m = poses.clone().requires_grad_(), matrices.clone().requires_grad_()
    out = em_routing(FactoredVotes(p, _block_weight(m), None, m), act, beta_a, beta_v, geometry=geometry, **options)
    (out.poses.square().sum() + out.activations.sum()).backward()
    return (*out, p.grad, m.grad)


OPTIONS = [{}, dict(activation="centred"), dict(activation="standardised", schedule="linear"),
           dict(activation="centred", truncate_gradient=True), dict(activation="offset"),
           dict(activation="offset", e_step_temperature=2.5, iteration_grad_scale=0.5)]


@needs_cc
@pytest.mark.parametrize("types", [3, 16])
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(map(str, o.values())) or "paper")
def test_compiled_routing_matches_eager_routing_values_and_gradients(options, types):
    geometry, poses, matrices, act, beta_a, beta_v = _conv_problem(types=types)
    reference = _route(False, *(t.double() for t in (poses, matrices, act, beta_a, beta_v)), geometry, **options)
    eager = _route(False, poses, matrices, act, beta_a, beta_v, geometry, **options)
    compiled = _route(True, poses, matrices, act, beta_a, beta_v, geometry, **options)
    for name, c, e, ref in zip(("poses", "activations", "assignments", "d poses", "d matrices"), compiled, eager, reference):
        # The compiled float32 routing is as close to the float64 routing as the eager float32 one.
        err_c, err_e = (c.double() - ref).abs().max().item(), (e.double() - ref).abs().max().item()
        assert err_c <= 4 * err_e + 1e-5 * ref.abs().max().item(), (name, err_c, err_e)


@needs_cc
@pytest.mark.parametrize("types", [3, 16])
def test_compiled_routing_gives_the_same_bits_with_one_or_two_threads(types):
    # Every row is one thread's work, so only the sum of the per-thread matrix gradients may differ.
    # 40 rows: three blocks of 16 rows for moments and quadratic, so both threads get some.
    geometry, poses, matrices, act, beta_a, beta_v = _conv_problem(seed=4, batch=10, types=types)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _route(True, poses, matrices, act, beta_a, beta_v, geometry)
        torch.set_num_threads(2)
        two = _route(True, poses, matrices, act, beta_a, beta_v, geometry)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one[:4], two[:4]):
        assert torch.equal(a, b)
    torch.testing.assert_close(one[4], two[4], rtol=1e-6, atol=1e-6 * one[4].abs().max().item())


@needs_cc
@pytest.mark.parametrize("name", ["em_tiny", "em_small"])
def test_model_trains_the_same_with_and_without_the_kernels(name):
    torch.manual_seed(0)
    model = create_model(name)
    x = torch.rand(4, model.in_channels, model.image_size, model.image_size)
    y = torch.tensor([0, 1, 2, 3]) % model.num_classes
    results = []
    for flag in (False, True):
        kernels.set_enabled(flag)
        model.zero_grad()
        out = model(x, y)
        spread_loss(out.activations, y, margin=0.2).backward()
        results.append((out.activations.detach(), [p.grad.clone() for p in model.parameters()]))
    (a_eager, g_eager), (a_compiled, g_compiled) = results
    torch.testing.assert_close(a_compiled, a_eager, rtol=1e-4, atol=1e-5)
    for ge, gc in zip(g_eager, g_compiled):
        torch.testing.assert_close(gc, ge, rtol=1e-3, atol=1e-3 * ge.abs().max().item() + 1e-7)


@needs_cc
def test_readers_fall_back_to_eager_where_the_kernels_do_not_apply(configure):
    poses, transforms, offsets, matrices, shape = _factors("conv")
    centre = factored_centre(poses, transforms, offsets, shape)
    f32 = [None if t is None else t.float() for t in (poses, transforms, offsets, matrices, centre)]
    assert kernels.em_votes(*f32, shape) is not None
    assert kernels.em_votes(poses, transforms, offsets, matrices, centre, shape) is None  # float64
    kernels.set_enabled(False)
    assert kernels.em_votes(*f32, shape) is None
    kernels.set_enabled(None)
    configure(mode="off")
    assert not kernels.enabled() and kernels.em_votes(*f32, shape) is None
    configure(mode="auto")
    assert kernels.enabled()


def test_a_compiler_that_fails_warns_once_and_routing_still_runs(configure, tmp_path):
    kernels._library = None
    configure(mode="auto", cache=tmp_path, compiler="false")  # nothing built there yet; false exits 1
    geometry, poses, matrices, act, beta_a, beta_v = _conv_problem()
    with pytest.warns(RuntimeWarning, match="falls back to eager") as caught:
        out = _route(None, poses, matrices, act, beta_a, beta_v, geometry)
        _route(None, poses, matrices, act, beta_a, beta_v, geometry)
    assert len([w for w in caught if "falls back" in str(w.message)]) == 1  # once per process
    assert all(torch.isfinite(t).all() for t in out)
    assert kernels._library is None and "false failed" in kernels._failed
    assert not list(tmp_path.rglob("*.so"))  # no partial library left behind


def test_a_compiler_that_fails_is_an_error_when_the_kernels_are_required(configure, tmp_path):
    kernels._library = None
    configure(mode="required", cache=tmp_path, compiler="no-such-compiler-capsnet")
    for _ in range(2):  # every time, not only the first
        with pytest.raises(RuntimeError, match="CAPSNET_KERNELS=1.*no C compiler"):
            kernels._load()


def test_matrices_of_the_wrong_shape_raise_value_error():
    geometry, poses, matrices, act, beta_a, beta_v = _conv_problem()
    with pytest.raises(ValueError, match="matrices must be"):
        em_routing(FactoredVotes(poses, _block_weight(matrices), None, matrices[:, :2]), act, beta_a, beta_v,
                   geometry=geometry)  # fmt: skip


def test_an_unwritable_cache_falls_back_to_the_temporary_directory(configure, monkeypatch, tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    configure(cache=blocked)  # kernels/ cannot be made under a file
    monkeypatch.setattr(kernels.tempfile, "tempdir", str(tmp_path / "tmp"))
    kernels._private = None
    (tmp_path / "tmp").mkdir()
    folder = kernels._cache_dir()
    assert folder.parent == tmp_path / "tmp" and folder.name.startswith("capsnet-kernels-")
    assert folder.stat().st_mode & 0o077 == 0  # private: nobody else can plant a library there
    assert kernels._cache_dir() == folder  # one folder per process


@needs_cc
def test_block_transforms_alone_get_their_gradient_on_the_compiled_path():
    # matrices given for speed but without a gradient: the block transforms must still get theirs.
    geometry, poses, matrices, act, beta_a, beta_v = _conv_problem(seed=5)
    grads = []
    for flag in (False, True):
        kernels.set_enabled(flag)
        block, p = _block_weight(matrices).requires_grad_(), poses.clone().requires_grad_()
        out = em_routing(FactoredVotes(p, block, None, matrices), act, beta_a, beta_v, geometry=geometry)
        (out.poses.square().sum() + out.activations.sum()).backward()
        grads.append((block.grad, p.grad))
    for compiled, eager in zip(*grads[::-1]):
        assert compiled is not None
        torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4 * eager.abs().max().item())


@needs_cc
def test_matrices_alone_get_their_gradient_on_both_paths():
    # Block transforms built without a gradient: the 4x4 matrices must still get theirs.
    geometry, poses, matrices, act, beta_a, beta_v = _conv_problem(seed=6)
    grads = []
    for flag in (False, True):
        kernels.set_enabled(flag)
        m = matrices.clone().requires_grad_()
        with torch.no_grad():
            block = _block_weight(m)
        out = em_routing(FactoredVotes(poses, block, None, m), act, beta_a, beta_v, geometry=geometry)
        (out.poses.square().sum() + out.activations.sum()).backward()
        grads.append(m.grad)
    reference = _route(False, poses, matrices, act, beta_a, beta_v, geometry)[4]  # through the block transforms
    for g in grads:
        assert g is not None
        torch.testing.assert_close(g, reference, rtol=1e-4, atol=1e-4 * reference.abs().max().item())


def test_activations_of_another_dtype_never_reach_the_kernels():
    geometry, poses, matrices, act, beta_a, beta_v = _conv_problem(seed=7)
    kernels.set_enabled(True)
    with pytest.raises(ValueError, match="activations is torch.bfloat16"):
        em_routing(FactoredVotes(poses, _block_weight(matrices), None, matrices), act.bfloat16(), beta_a, beta_v,
                   geometry=geometry)  # fmt: skip


def test_the_private_temporary_folder_is_removed_at_exit(configure, monkeypatch, tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    configure(cache=blocked)
    monkeypatch.setattr(kernels.tempfile, "tempdir", str(tmp_path))
    registered = []
    monkeypatch.setattr(kernels.atexit, "register", registered.append)
    kernels._private = None
    folder = kernels._cache_dir()
    assert folder.is_dir() and registered == [kernels._remove_private]
    registered[0]()
    assert not folder.exists() and kernels._private is None


def test_without_a_compiler_models_train_exactly_as_with_the_kernels_off(configure, tmp_path):
    kernels._library = None
    configure(mode="auto", cache=tmp_path, compiler="no-such-compiler-capsnet")
    torch.manual_seed(0)
    model = create_model("em_tiny")
    x = torch.rand(4, model.in_channels, model.image_size, model.image_size)
    y = torch.tensor([0, 1, 2, 3]) % model.num_classes
    results = []
    for flag in (False, None):
        kernels.set_enabled(flag)
        model.zero_grad()
        with pytest.warns(RuntimeWarning, match="no C compiler") if flag is None else _no_warning():
            out = model(x, y)
        spread_loss(out.activations, y, margin=0.2).backward()
        results.append([out.activations.detach(), *(p.grad.clone() for p in model.parameters())])
    assert all(torch.equal(a, b) for a, b in zip(*results))
    assert not list(tmp_path.rglob("*.so"))


def _no_warning():
    import contextlib
    import warnings

    @contextlib.contextmanager
    def block():
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            yield

    return block()


def test_build_is_explicit_and_follows_the_mode(configure, tmp_path):
    configure(mode="off", cache=tmp_path, compiler="no-such-compiler-capsnet")
    with _no_warning():
        assert kernels.build() is False  # off: nothing is tried
    configure(mode="auto", cache=tmp_path, compiler="no-such-compiler-capsnet")
    kernels._library = None
    with pytest.warns(RuntimeWarning, match="no C compiler"):
        assert kernels.build() is False
    configure(mode="required", cache=tmp_path, compiler="no-such-compiler-capsnet")
    with pytest.raises(RuntimeError, match="required.*no C compiler"):
        kernels.build()


@pytest.mark.skipif(sys.platform == "win32", reason="a shell script as the compiler")
def test_a_compiler_that_hangs_is_stopped_after_the_timeout(configure, tmp_path):
    hangs = tmp_path / "hanging-cc"
    hangs.write_text("#!/bin/sh\nsleep 30\n")
    hangs.chmod(0o755)
    kernels._library = None
    configure(mode="auto", cache=tmp_path / "cache", compiler=str(hangs), timeout=0.5)
    with pytest.warns(RuntimeWarning, match=r"took more than 0.5 s"):
        assert kernels.build() is False
    assert not list((tmp_path / "cache").rglob("*.so"))  # the temporary output is removed too


def test_configure_refuses_unknown_settings(configure):
    with pytest.raises(ValueError, match="mode must be one of"):
        configure(mode="sometimes")
    with pytest.raises(ValueError, match="timeout must be > 0"):
        configure(timeout=0)


@needs_cc
@pytest.mark.skipif(kernels.fcntl is None, reason="no fcntl: builds are not serialised here")
@pytest.mark.slow
def test_the_build_holds_a_lock_beside_the_library_while_it_compiles(configure, monkeypatch, tmp_path):
    configure(cache=tmp_path)
    kernels._library = None
    run, held = kernels.subprocess.run, []

    def compiling(command, **kwargs):
        lock = next((tmp_path / "kernels").glob("*.lock"))
        with open(lock, "a") as other:  # another process's open file: it must wait
            try:
                kernels.fcntl.flock(other.fileno(), kernels.fcntl.LOCK_EX | kernels.fcntl.LOCK_NB)
            except BlockingIOError:
                held.append(lock)
        return run(command, **kwargs)

    monkeypatch.setattr(kernels.subprocess, "run", compiling)
    assert kernels.build()
    assert held and held[0].with_suffix(".so").exists()
    kernels._library, calls = None, len(held)
    assert kernels.build() and len(held) == calls  # built once: the next process loads it


def test_the_command_line_reads_the_kernel_environment():
    assert kernel_settings({}) == dict(mode="auto", cache=None, compiler="cc")
    for off in ("0", "false", "Off", "no"):
        assert kernel_settings({"CAPSNET_KERNELS": off})["mode"] == "off"
    assert kernel_settings({"CAPSNET_KERNELS": "1", "CAPSNET_CACHE": "/c", "CC": "clang"}) == dict(mode="required", cache="/c", compiler="clang")


@needs_cc
@pytest.mark.parametrize("count", [3, 0, 9])
@pytest.mark.parametrize("kind", ["conv", "class", "conv16", "class16", "conv24"])
def test_factor_gradients_match_autograd_through_the_votes(kind, count):
    """The 4x4 gradient kernels (today's layout, and the lanes over types for J = 16, 24) against
    autograd of ``sum_t <L_t (x) R1_t, X> + <L_t (x) R2_t, X^2>`` with ``X = poses @ W + offsets - c``
    built whole in float64: the poses' and the 4x4 matrices' gradients, offsets and shared transforms
    included; no term (zeros), and more terms than the lanes kernels take (9 > 8: today's kernel)."""
    poses, transforms, offsets, matrices, shape = _factors(kind)
    slots, batch, patches, types, dim = shape
    n = batch * patches * types
    centre = factored_centre(poses, transforms, offsets, shape)
    gen = torch.Generator().manual_seed(5)
    terms = [(torch.randn(slots, n, generator=gen, dtype=F64), torch.randn(n, dim, generator=gen, dtype=F64),
              torch.randn(n, dim, generator=gen, dtype=F64)) for _ in range(count)]  # fmt: skip
    p, m = poses.clone().requires_grad_(), matrices.clone().requires_grad_()
    x = torch.bmm(p, _block_weight(m)).view(slots, n, dim) - centre
    if offsets is not None:
        x = x + offsets.unsqueeze(1)
    loss = sum((left.unsqueeze(-1) * (r1 * x + r2 * x.square())).sum() for left, r1, r2 in terms) + 0 * x.sum()
    want_p, want_m = torch.autograd.grad(loss, [p, m])
    f32 = [None if t is None else t.float() for t in (poses, transforms, offsets, matrices, centre)]
    compiled = kernels.em_votes(*f32, shape)
    got_p, got_m = compiled.factor_gradients([tuple(t.float() for t in term) for term in terms], True, True)
    torch.testing.assert_close(got_p.double(), want_p, rtol=1e-4, atol=1e-4 * want_p.abs().max().item() + 1e-12)
    torch.testing.assert_close(got_m.double(), want_m, rtol=1e-4, atol=1e-4 * want_m.abs().max().item() + 1e-12)
