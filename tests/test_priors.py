"""The CIFAR-10 (DDPM) and ImageNet-256 (ADM) diffusion priors: parameter counts and
checkpoint layouts against lists written here from the published architectures, strict
loading, the ADM attention and timestep embedding against direct computations, IWMF-Diff
end to end with a tiny ADM (exact gradients included), and missing weights."""

import hashlib
import math

import pytest
import torch

from iwmf_bench.defenses import ddrm
from iwmf_bench.defenses.adm_unet import ADMUNet, Attention, timestep_embedding
from iwmf_bench.defenses.diffusion import IWMFDiff
from iwmf_bench.defenses.diffusion_prior import build_unet, load_prior_config, load_unet
from iwmf_bench.errors import WeightsError
from iwmf_bench.weights import get_checkpoint, resolve, verify


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny workloads: see conftest


# --- layouts, written from the published architecture descriptions ------------------------

def layout_writers(keys):
    """``add(name, *shape)``: a weight of that shape and its bias; ``norm(name, c)``: a
    normalization's weight and bias of ``c`` channels; both record into ``keys``."""
    def add(name, *shape):
        keys[name + ".weight"] = shape
        keys[name + ".bias"] = shape[:1]

    def norm(name, c):
        keys[name + ".weight"] = keys[name + ".bias"] = (c,)

    return add, norm


def ddpm_layout(res, ch, mult, nrb, attn, in_ch=3, out_ch=3):
    """Keys and shapes of a DDPM UNet as ported by pytorch_diffusion (DDRM's Model)."""
    t = 4 * ch
    keys = {}
    add, norm = layout_writers(keys)

    def resblock(p, cin, cout):
        norm(p + ".norm1", cin)
        add(p + ".conv1", cout, cin, 3, 3)
        add(p + ".temb_proj", cout, t)
        norm(p + ".norm2", cout)
        add(p + ".conv2", cout, cout, 3, 3)
        if cin != cout:
            add(p + ".nin_shortcut", cout, cin, 1, 1)

    def attention(p, c):
        norm(p + ".norm", c)
        for proj in ("q", "k", "v", "proj_out"):
            add(f"{p}.{proj}", c, c, 1, 1)

    add("temb.dense.0", t, ch)
    add("temb.dense.1", t, t)
    add("conv_in", ch, in_ch, 3, 3)
    widths, c, r = [ch], ch, res
    for i, m in enumerate(mult):
        for j in range(nrb):
            resblock(f"down.{i}.block.{j}", c, ch * m)
            c = ch * m
            if r in attn:
                attention(f"down.{i}.attn.{j}", c)
            widths.append(c)
        if i < len(mult) - 1:
            add(f"down.{i}.downsample.conv", c, c, 3, 3)
            widths.append(c)
            r //= 2
    resblock("mid.block_1", c, c)
    attention("mid.attn_1", c)
    resblock("mid.block_2", c, c)
    for i in reversed(range(len(mult))):
        for j in range(nrb + 1):
            resblock(f"up.{i}.block.{j}", c + widths.pop(), ch * mult[i])
            c = ch * mult[i]
            if r in attn:
                attention(f"up.{i}.attn.{j}", c)
        if i > 0:
            add(f"up.{i}.upsample.conv", c, c, 3, 3)
            r *= 2
    norm("norm_out", c)
    add("conv_out", out_ch, c, 3, 3)
    return keys


def adm_layout(res, ch, mult, nrb, attn, in_ch=3, out_ch=6):
    """Keys and shapes of guided diffusion's UNetModel with scale-shift norm and
    resampling ResBlocks (Dhariwal & Nichol 2021; the 256x256 unconditional model)."""
    t = 4 * ch
    keys = {}
    add, norm = layout_writers(keys)

    def resblock(p, cin, cout):
        norm(p + ".in_layers.0", cin)
        add(p + ".in_layers.2", cout, cin, 3, 3)
        add(p + ".emb_layers.1", 2 * cout, t)  # scale and shift
        norm(p + ".out_layers.0", cout)
        add(p + ".out_layers.3", cout, cout, 3, 3)
        if cin != cout:
            add(p + ".skip_connection", cout, cin, 1, 1)

    def attention(p, c):
        norm(p + ".norm", c)
        add(p + ".qkv", 3 * c, c, 1)  # Conv1d
        add(p + ".proj_out", c, c, 1)

    add("time_embed.0", t, ch)
    add("time_embed.2", t, t)
    add("input_blocks.0.0", ch * mult[0], in_ch, 3, 3)
    n, c, r, widths = 1, ch * mult[0], res, [ch * mult[0]]
    for i, m in enumerate(mult):
        for _ in range(nrb):
            resblock(f"input_blocks.{n}.0", c, ch * m)
            c = ch * m
            if r in attn:
                attention(f"input_blocks.{n}.1", c)
            widths.append(c)
            n += 1
        if i < len(mult) - 1:
            resblock(f"input_blocks.{n}.0", c, c)  # downsampling ResBlock
            widths.append(c)
            n, r = n + 1, r // 2
    resblock("middle_block.0", c, c)
    attention("middle_block.1", c)
    resblock("middle_block.2", c, c)
    n = 0
    for i in reversed(range(len(mult))):
        for j in range(nrb + 1):
            resblock(f"output_blocks.{n}.0", c + widths.pop(), ch * mult[i])
            c, k = ch * mult[i], 1
            if r in attn:
                attention(f"output_blocks.{n}.1", c)
                k = 2
            if i > 0 and j == nrb:
                resblock(f"output_blocks.{n}.{k}", c, c)  # upsampling ResBlock
                r *= 2
            n += 1
    norm("out.0", c)
    add("out.2", out_ch, c, 3, 3)
    return keys


def layout_sha256(layout):
    lines = "\n".join(f"{k}:{'x'.join(map(str, s))}" for k, s in sorted(layout.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


# name: (expected layout, parameters, tensors, sha256 of the sorted "key:shape" lines of the
# reference model: DDRM's models/diffusion.py Model for cifar10, DDRM's copy of
# guided-diffusion's UNetModel with configs/imagenet_256.yml; computed once from that code).
PRIORS = {
    "cifar10": (lambda: ddpm_layout(32, 128, (1, 2, 2, 2), 2, (16,)), 35_746_307, 328,
                "cd07e6695594965dc91801d0bc4f4524bc411e52cfd139143a1d051a9351cb60"),
    "imagenet_256": (lambda: adm_layout(256, 256, (1, 1, 2, 2, 4, 4), 2, (32, 16, 8)), 552_814_086, 566,
                     "8d8ba2914be03b7a7350ccc8f9dc691ca3d9ad23ebb4324a0732d68464a2387a"),
}


def meta_unet(name):
    with torch.device("meta"):  # shapes only: the 553M-parameter model costs no memory
        return build_unet(load_prior_config(name).unet)


@pytest.mark.parametrize("name", PRIORS)
def test_parameter_count_and_checkpoint_layout(name):
    make_layout, params, tensors, ref_sha = PRIORS[name]
    expected = make_layout()
    assert len(expected) == tensors and layout_sha256(expected) == ref_sha
    assert sum(math.prod(s) for s in expected.values()) == params
    unet = meta_unet(name)
    assert sum(p.numel() for p in unet.parameters()) == params
    assert {k: tuple(v.shape) for k, v in unet.state_dict().items()} == expected


@pytest.mark.parametrize("name,checkpoint", [("cifar10", "cifar10-ddpm"), ("imagenet_256", "imagenet256-adm")])
def test_checkpoint_with_published_layout_loads_strictly(tmp_path, name, checkpoint):
    shapes = PRIORS[name][0]()
    prior = load_prior_config(name)
    assert prior.checkpoint == checkpoint
    # Stride-0 expanded zeros: the real names and shapes in a file of a few kB.
    path = tmp_path / "ckpt.pt"
    torch.save({k: torch.zeros(()).expand(s) for k, s in shapes.items()}, path)
    unet = load_unet(prior, resolve(checkpoint, weights=path))
    assert {k: tuple(v.shape) for k, v in unet.state_dict().items()} == shapes
    assert IWMFDiff(config=name, weights=path).unet is None  # resolved now, built lazily

    dropped = {"cifar10": "mid.attn_1.q.weight", "imagenet_256": "middle_block.1.qkv.weight"}[name]
    torch.save({k: torch.zeros(()).expand(s) for k, s in shapes.items() if k != dropped}, tmp_path / "broken.pt")
    with pytest.raises(WeightsError, match="does not match"):
        load_unet(prior, tmp_path / "broken.pt")


# --- the ADM pieces against direct computations --------------------------------------------

def test_adm_timestep_embedding():
    t = torch.tensor([0.0, 1.0, 37.5, 999.0])
    dim = 10
    emb = timestep_embedding(t, dim)
    for b, tv in enumerate(t.tolist()):
        freqs = [10000 ** (-k / 5) for k in range(5)]
        expected = [math.cos(tv * f) for f in freqs] + [math.sin(tv * f) for f in freqs]
        assert emb[b].tolist() == pytest.approx(expected, abs=3e-4)  # float32 angles up to 999


def test_adm_attention_matches_per_head_loop():
    g = torch.Generator().manual_seed(0)
    c, heads, d = 64, 4, 16
    att = Attention(c, heads).double()
    with torch.no_grad():
        for p in att.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) / 4)
    x = torch.randn(2, c, 5, 3, generator=g, dtype=torch.float64)
    flat = x.reshape(2, c, 15)
    qkv = att.qkv(att.norm(flat))
    outs = []
    for h in range(heads):  # channels of head h: [q; k; v], d each
        q, k, v = (qkv[:, (3 * h + i) * d:(3 * h + i + 1) * d] for i in range(3))
        w = torch.softmax(torch.einsum("bct,bcs->bts", q, k) / math.sqrt(d), dim=-1)
        outs.append(torch.einsum("bts,bcs->bct", w, v))
    expected = flat + att.proj_out(torch.cat(outs, dim=1))
    assert torch.allclose(att(x), expected.reshape(x.shape), rtol=0, atol=1e-12)


# --- IWMF-Diff end to end with a tiny ADM ------------------------------------------------------

def test_tiny_adm_purification():
    x = torch.rand(3, 3, 40, 36, generator=torch.Generator().manual_seed(5))  # resized to 32x32 and back
    d = IWMFDiff(config="tiny_adm", pretrained=False, timesteps=4, batch_size=2)
    assert isinstance(d.load_model(), ADMUNet) and d.unet.cfg.out_channels == 6
    out = d.purify(x, torch.Generator().manual_seed(6))
    assert out.shape == x.shape and 0 <= out.min() and out.max() <= 1
    assert torch.equal(out, d.purify(x, torch.Generator().manual_seed(6)))
    assert not torch.allclose(out, d.purify(x, torch.Generator().manual_seed(7)))
    one = IWMFDiff(config="tiny_adm", pretrained=False, timesteps=4, batch_size=1)
    assert torch.allclose(out, one.purify(x, torch.Generator().manual_seed(6)), atol=1e-5)
    # DDRM sees only eps, the first 3 of the 6 output channels: the variance half of the
    # last conv changes the UNet's output but not the purification.
    with torch.no_grad():
        d.unet.out[2].weight[3:].normal_(generator=torch.Generator().manual_seed(1))
        d.unet.out[2].bias[3:] += 1.0
    assert torch.equal(out, d.purify(x, torch.Generator().manual_seed(6)))


def test_tiny_adm_matches_ddrm_on_its_eps_channels():
    d = IWMFDiff(lambda_0=0.0, sigma_y=0.1, config="tiny_adm", pretrained=False, timesteps=3)
    unet = d.load_model()
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    out = d.purify(x, torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = ddrm.ddrm_denoise(lambda xt, t: unet(xt, t)[:, :3], 2 * x - 1, 0.2, d.prior.alphas_cumprod(), 3,
                                torch.Generator().manual_seed(3))
    assert torch.allclose(out, ((ref + 1) / 2).clamp(0, 1), atol=1e-6)



# --- weights ---------------------------------------------------------------------------------

OFFLINE = [("cifar10", "cifar10-ddpm"), ("imagenet_256", "imagenet256-adm")]


@pytest.mark.parametrize("name,checkpoint", OFFLINE)
def test_missing_weights_name_the_fetch_command(tmp_path, monkeypatch, capsys, name, checkpoint):
    from iwmf_bench.cli import main

    monkeypatch.setenv("IWMF_BENCH_HOME", str(tmp_path))
    with pytest.raises(WeightsError, match=f"iwmf-bench fetch {checkpoint}"):
        IWMFDiff(config=name)
    (tmp_path / "in").mkdir()
    code = main(["purify", "--defense", "iwmfdiff", "-D", f"config={name}", "--input", str(tmp_path / "in"),
                 "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and f"`iwmf-bench fetch {checkpoint}`" in err
    assert get_checkpoint(name) is get_checkpoint(checkpoint)  # the prior's name works as an alias


def test_suite_cells_of_missing_priors_are_skipped(tmp_path, monkeypatch, shared_imgs):
    from iwmf_bench.runner import run_cells
    from iwmf_bench.suite import load_suite

    monkeypatch.setenv("IWMF_BENCH_HOME", str(tmp_path))
    cfg = tmp_path / "suite.yaml"
    cfg.write_text(f"""\
name: priors
seed: 0
device: cpu
data: {{sources: "{shared_imgs / 'source'}", targets: "{shared_imgs / 'target'}", align: true, pairs: 2}}
models: {{dlib-resnet: {{}}}}
defenses:
  iwmfdiff-cifar10: {{defense: iwmfdiff, config: cifar10}}
  iwmfdiff-imagenet: {{defense: iwmfdiff, config: imagenet_256}}
threat_models:
  clean: {{attack: null}}
""")
    records = run_cells(load_suite(cfg).cells(), tmp_path / "results", progress=False)
    reasons = {r["name"]: r["reason"] for r in records if r["status"] == "skipped"}
    assert len(records) == len(reasons) == 2
    assert "iwmf-bench fetch cifar10-ddpm" in reasons["dlib-resnet/iwmfdiff-cifar10/clean"]
    assert "iwmf-bench fetch imagenet256-adm" in reasons["dlib-resnet/iwmfdiff-imagenet/clean"]


def test_published_md5_is_checked(tmp_path, monkeypatch):
    monkeypatch.setenv("IWMF_BENCH_HOME", str(tmp_path))
    ckpt = get_checkpoint("cifar10-ddpm")
    path = tmp_path / "weights" / ckpt.filename
    path.parent.mkdir()
    path.write_bytes(b"not the checkpoint")
    with pytest.raises(WeightsError, match="md5 .* does not match the published 1fa350b9"):
        resolve("cifar10-ddpm")
    with pytest.raises(WeightsError, match="md5"):
        verify(ckpt, path)
