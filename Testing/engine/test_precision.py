"""The encoders' precision (--precision, protosam.precision): the type that actually runs inside
DINOv2's and SAM's forward passes, the refusals with their messages, what ``auto`` picks, and
the option's way from the command line, a worker process's engine spec and a real server's
request to the engine."""
from __future__ import annotations

import argparse
import dataclasses
import logging

import httpx
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from protosam import Engine, precision
from protosam.cli import main
from protosam.errors import InputError
from protosam.models.sam_decoder import SharedImageDecoder
from protosam.serving import protocol
from protosam.testing import start_server

from engine_helpers import bearer, box_volume, segment_volume_request
from test_protocol import receive_reply, worker  # noqa: F401 (worker: the real worker process fixture)


def record_linear_dtypes(module: torch.nn.Module):
    """The dtype of every nn.Linear output inside ``module`` while it runs -> (list, hook handles)."""
    seen = []
    handles = [layer.register_forward_hook(lambda layer, inputs, output: seen.append(output.dtype))
               for layer in module.modules() if isinstance(layer, torch.nn.Linear)]
    assert handles, f"{type(module).__name__} has no Linear layer to watch"
    return seen, handles


def encoder_dtypes(engine: Engine):
    """Run both encoders on one slice -> (DINOv2's Linear output dtypes, SAM image encoder's)."""
    dinov2, dinov2_hooks = record_linear_dtypes(engine.encoder)
    sam, sam_hooks = record_linear_dtypes(engine.refiner.sam.image_encoder)
    try:
        images = engine.to_model_input(np.random.default_rng(0).random((1, 40, 40), dtype=np.float32))
        features = engine.encode(images)
        embedding = engine.sam_embedding(images[0])
    finally:
        for handle in dinov2_hooks + sam_hooks:
            handle.remove()
    # Whatever ran inside, the engine hands float32 onwards (ALPNet, the mask decoder).
    assert features.dtype == embedding.dtype == torch.float32
    return set(dinov2), set(sam)


def decoder_dtypes(engine: Engine):
    """Decode one prompt set on one slice -> SAM mask decoder's Linear output dtypes; the logits
    and scores come back as float32 and SAM's own decoder keeps its float32 weights."""
    images = engine.to_model_input(np.random.default_rng(1).random((1, 40, 40), dtype=np.float32))
    embedding = engine.sam_embedding(images[0])
    sam = engine.refiner.sam
    with torch.inference_mode():
        sparse, _ = sam.prompt_encoder(points=(torch.tensor([[[500.0, 520.0]]]), torch.tensor([[1]])),
                                       boxes=torch.tensor([[300.0, 280.0, 700.0, 760.0]]), masks=None)
    seen, hooks = record_linear_dtypes(engine.refiner.shared_decoder.mask_decoder)
    try:
        logits, scores = engine.refiner.shared_decoder.decode(embedding, sparse, multimask_output=True)
    finally:
        for handle in hooks:
            handle.remove()
    assert logits.dtype == scores.dtype == torch.float32
    assert {p.dtype for p in sam.mask_decoder.parameters()} == {torch.float32}
    return set(seen)


# What auto runs on this machine's CPU: bf16 where it has bfloat16 units (docs/performance.md).
AUTO_HERE = "bf16" if precision.AUTO_PICKS_BF16_ON_CPUS_WITH_BF16_UNITS and precision.cpu_bf16_units() else "fp32"
AUTO_DTYPE_HERE = {"bf16": torch.bfloat16, "fp32": torch.float32}[AUTO_HERE]


@pytest.mark.parametrize("asked, runs", [("fp32", torch.float32), ("bf16", torch.bfloat16), ("auto", AUTO_DTYPE_HERE)])
def test_the_precision_runs_inside_both_encoders_and_the_choice_is_logged(tiny_models, one_thread, caplog,
                                                                         asked, runs):
    with caplog.at_level(logging.INFO, logger="protosam.engine"):
        engine = Engine(tiny_models, device="cpu", precision=asked)
    resolved = {torch.float32: "fp32", torch.bfloat16: "bf16"}[runs]
    assert engine.precision == resolved and engine.preset.precision == asked
    assert f"precision {asked} -> {resolved} on cpu (" in caplog.text
    assert encoder_dtypes(engine) == ({runs}, {runs})
    # On a CPU a bf16 run decodes in bf16 too (SharedImageDecoder's dtype).
    assert decoder_dtypes(engine) == {runs}


# The stated bound of docs/performance.md ("bf16 on a CPU"): bf16 autocast against float32, max
# absolute error over the largest float32 magnitude, for DINOv2 features, SAM image embeddings
# and SAM's mask logits decoded from each embedding in the run's precision (a bf16 engine on a
# CPU decodes in bf16).
BF16_RELATIVE_BOUND = 0.05


def test_bf16_stays_within_the_stated_error_bound_of_fp32(tiny_models, one_thread):
    from protosam.models.sam import upsample_mask_logits

    engines = {name: Engine(tiny_models, preset="default", device="cpu", precision=name) for name in ("fp32", "bf16")}
    images = engines["fp32"].to_model_input(np.random.default_rng(3).random((1, 40, 40), dtype=np.float32))
    sam = engines["fp32"].refiner.sam
    with torch.inference_mode():
        sparse, _ = sam.prompt_encoder(points=(torch.tensor([[[500.0, 520.0]]]), torch.tensor([[1]])),
                                       boxes=torch.tensor([[300.0, 280.0, 700.0, 760.0]]), masks=None)
    outputs = {}
    for name, engine in engines.items():
        embedding = engine.sam_embedding(images[0])
        low_res, _ = engine.refiner.shared_decoder.decode(embedding, sparse, multimask_output=True)
        outputs[name] = {"dinov2": engine.encode(images), "sam": embedding,
                         "mask logits": upsample_mask_logits(low_res[:, :1])}
    for what, reference in outputs["fp32"].items():
        error = (outputs["bf16"][what] - reference).abs().max().item() / reference.abs().max().item()
        assert 0 < error <= BF16_RELATIVE_BOUND, f"{what}: bf16 error {error:.3g} of the largest value"


def test_fp16_is_refused_on_a_cpu_and_paper_pins_fp32(tiny_models, one_thread):
    with pytest.raises(InputError, match=r"fp16 runs only on NVIDIA GPUs \(CUDA\), not on CPUs.*choose precision fp32"):
        Engine(tiny_models, device="cpu", precision="fp16")
    with pytest.raises(InputError, match=r"Preset 'paper' pins precision fp32.*precision bf16 cannot go with it"):
        Engine(tiny_models, preset="paper", device="cpu", precision="bf16")
    with pytest.raises(InputError, match="Unknown precision 'fp8'"):
        Engine(tiny_models, device="cpu", precision="fp8")
    paper = Engine(tiny_models, preset="paper", device="cpu", precision="auto")  # auto: the pinned fp32
    assert paper.precision == "fp32" and "preset paper pins fp32" in paper.precision_note
    assert encoder_dtypes(paper) == ({torch.float32}, {torch.float32})


def test_what_auto_picks_on_each_device(monkeypatch):
    """The decisions of resolve_precision for hardware this machine may not have (the GPU facts
    that torch reports are replaced; the rules are what is tested)."""
    monkeypatch.setattr(precision, "cpu_bf16_units", lambda: ["amx_bf16", "avx512_bf16"])
    cpu = torch.device("cpu")
    chosen, why = precision.resolve_precision("auto", cpu)  # the benchmark's decision
    assert chosen == "bf16" and why == "this CPU has bfloat16 units: amx_bf16, avx512_bf16"
    monkeypatch.setattr(precision, "AUTO_PICKS_BF16_ON_CPUS_WITH_BF16_UNITS", False)  # the switch back
    chosen, why = precision.resolve_precision("auto", cpu)
    assert chosen == "fp32" and "auto keeps float32 on CPUs" in why
    monkeypatch.setattr(precision, "AUTO_PICKS_BF16_ON_CPUS_WITH_BF16_UNITS", True)
    monkeypatch.setattr(precision, "cpu_bf16_units", lambda: [])
    assert precision.resolve_precision("auto", cpu)[0] == "fp32"
    chosen, why = precision.resolve_precision("bf16", cpu)  # runs, but says it is emulated
    assert chosen == "bf16" and "no bfloat16 units" in why and "slower" in why

    cuda = torch.device("cuda")
    monkeypatch.setattr(precision, "_cuda_bf16", lambda device: (True, "NVIDIA A100, compute capability 8.0"))
    assert precision.resolve_precision("auto", cuda)[0] == "bf16"
    assert precision.resolve_precision("fp16", cuda)[0] == "fp16"
    monkeypatch.setattr(precision, "_cuda_bf16", lambda device: (False, "Tesla T4, compute capability 7.5"))
    assert precision.resolve_precision("auto", cuda)[0] == "fp32"
    with pytest.raises(InputError, match=r"bfloat16 units.*Tesla T4.*choose precision fp16"):
        precision.resolve_precision("bf16", cuda)
    with pytest.raises(InputError, match=r"not on Apple GPUs \(MPS\)"):
        precision.resolve_precision("fp16", torch.device("mps"))


def test_this_machines_bf16_units_are_read_from_torch_and_cpuinfo():
    units = precision.cpu_bf16_units()
    flags = precision._cpuinfo_flags()
    assert set(units) >= {flag for flag in flags if flag in ("avx512_bf16", "amx_bf16")}


def dinov2_attention_is_fused(engine: Engine) -> bool:
    from protosam.models.vit_blocks import Attention

    settings = {layer.fused for layer in engine.encoder.modules() if isinstance(layer, Attention)}
    assert len(settings) == 1, settings
    return settings.pop()


def test_dinov2_explicit_attention_is_kept_for_float32_only(tiny_models, one_thread):
    """A preset that asks for DINOv2's explicit attention (paper semantics) gets it in float32,
    where it agrees with the reference to the last bits; under bf16 autocast the fast form runs
    (no agreement to keep, and the explicit form was 1.7x slower there), also after a GPU
    out-of-memory fallback chose the precision again."""
    from protosam.presets import PRESETS

    explicit = PRESETS["paper"]
    assert not explicit.fused_attention
    assert not dinov2_attention_is_fused(Engine(tiny_models, preset=explicit, device="cpu"))
    bf16 = Engine(tiny_models, preset=dataclasses.replace(explicit, name="paper-bf16", precision="bf16"), device="cpu")
    assert bf16.dinov2_fused_attention and dinov2_attention_is_fused(bf16)
    with bf16.reference_kernels():  # the reference's own explicit kernels while open
        assert not dinov2_attention_is_fused(bf16)
    assert dinov2_attention_is_fused(bf16)
    assert encoder_dtypes(bf16)[0] == {torch.bfloat16}
    # Built "on a GPU" in fp16, out of memory there: on the CPU auto gives AUTO_HERE.
    fallback = Engine(tiny_models, preset=explicit, device="cpu")
    fallback.preset = dataclasses.replace(explicit, precision="fp16")
    fallback.device, fallback.precision, fallback.batch_size = torch.device("cuda"), "fp16", 1
    fallback.encoder.set_fused_attention(fallback.dinov2_fused_attention)
    assert dinov2_attention_is_fused(fallback)
    fallback._recover_from_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)"))
    assert dinov2_attention_is_fused(fallback) == (AUTO_HERE != "fp32")


@pytest.mark.parametrize("asked, on_the_cpu", [("fp16", AUTO_HERE), ("auto", AUTO_HERE), ("bf16", "bf16")])
def test_a_gpu_out_of_memory_fallback_chooses_again_for_the_cpu(tiny_models, asked, on_the_cpu):
    """fp16 cannot follow the models onto the CPU, and auto means there what it means on a CPU."""
    engine = Engine(tiny_models, device="cpu")
    # As if built on a GPU with bfloat16 units (the precision auto or bf16 resolves to there).
    engine.preset = dataclasses.replace(engine.preset, precision=asked)
    engine.device, engine.precision, engine.batch_size = torch.device("cuda"), "bf16" if asked == "auto" else asked, 1
    engine.refiner.shared_decoder = SharedImageDecoder(engine.refiner.sam)  # a GPU engine's: float32
    engine._recover_from_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)"))
    assert engine.device.type == "cpu" and engine.precision == on_the_cpu
    assert engine.precision_note.startswith(f"precision {asked} -> {on_the_cpu} on cpu (")
    # The decoder follows the precision chosen again (bf16 decoding on a CPU for a bf16 run).
    assert engine.refiner.shared_decoder.dtype == {"bf16": torch.bfloat16, "fp32": torch.float32}[on_the_cpu]


# ----------------------------------------------------------------------------- the command line
@pytest.fixture(scope="module")
def small_case(tmp_path_factory):
    """A 6-slice NIfTI volume with a box painted on one slice."""
    folder = tmp_path_factory.mktemp("precision_case")
    volume, mask = box_volume(6, 40)
    for array, name in ((volume, "image.nii.gz"), (mask, "mask.nii.gz")):
        sitk.WriteImage(sitk.GetImageFromArray(array), str(folder / name))
    return folder


def segment_args(models, folder, output, *extra):
    return ["segment", "--image", str(folder / "image.nii.gz"), "--support-mask", str(folder / "mask.nii.gz"),
            "--output", str(output), "--modality", "none", "--device", "cpu", "--dinov2", models.dinov2,
            "--dinov2-checkpoint", models.dinov2_checkpoint, "--sam", models.sam, "--sam-checkpoint",
            models.sam_checkpoint, "--input-size", str(models.input_size), *extra]


def test_segment_precision_reaches_the_encoders(tiny_models, small_case, tmp_path, one_thread, monkeypatch, capsys):
    seen = {}
    original = Engine.__init__

    def watched(engine, *args, **kwargs):
        original(engine, *args, **kwargs)
        seen["dinov2"], _ = record_linear_dtypes(engine.encoder)
        seen["sam"], _ = record_linear_dtypes(engine.refiner.sam.image_encoder)

    monkeypatch.setattr(Engine, "__init__", watched)
    output = tmp_path / "out.nii.gz"
    assert main(segment_args(tiny_models, small_case, output, "--precision", "bf16")) == 0, capsys.readouterr().err
    assert set(seen["dinov2"]) == set(seen["sam"]) == {torch.bfloat16}
    assert "protosam: precision bf16 -> bf16 on cpu (" in capsys.readouterr().err and output.is_file()


@pytest.mark.parametrize("extra, message", [
    (["--precision", "fp16"], "fp16 runs only on NVIDIA GPUs"),
    (["--preset", "paper", "--precision", "bf16"], "Preset 'paper' pins precision fp32"),
])
def test_segment_refuses_what_cannot_run_and_writes_nothing(tiny_models, small_case, tmp_path, capsys, extra, message):
    output = tmp_path / "out.nii.gz"
    assert main(segment_args(tiny_models, small_case, output, *extra)) == 1
    assert message in capsys.readouterr().err and not output.exists()


def test_batch_and_ray_actors_carry_the_precision(tiny_models, one_thread):
    from protosam.cli import build_parser
    from protosam.cohorts.batch import RunParameters
    from protosam.cohorts.ray_cluster import MODEL_OPTIONS, BatchWorker

    args = build_parser().parse_args([
        "batch", "--manifest", "rows.csv", "--device", "cpu", "--precision", "bf16",
        "--dinov2", tiny_models.dinov2, "--dinov2-checkpoint", tiny_models.dinov2_checkpoint, "--sam", tiny_models.sam,
        "--sam-checkpoint", tiny_models.sam_checkpoint, "--input-size", str(tiny_models.input_size)])
    # A resumed batch re-runs its rows when the precision changed (it decides the outputs).
    assert RunParameters(args).common["preset"]["precision"] == "bf16"
    actor = BatchWorker({name: getattr(args, name) for name in MODEL_OPTIONS}, threads=1)
    actor.start()
    assert actor.engine.precision == "bf16" and encoder_dtypes(actor.engine) == ({torch.bfloat16}, {torch.bfloat16})
    paper = argparse.Namespace(**{**vars(args), "preset": "paper"})
    with pytest.raises(InputError, match="pins precision fp32"):
        RunParameters(paper)


# ----------------------------------------------------------------------------- worker and server
def test_a_real_worker_builds_the_engine_its_spec_asks_for(worker, tmp_path, tiny_models):  # noqa: F811
    channel, _ = worker
    volume, mask = box_volume(4, 40)
    request = segment_volume_request(tiny_models, volume, mask)
    request.engine["precision"] = "bf16"
    channel.send(request)
    notes = []
    while True:
        message = protocol.decode(channel.receive(), file_dir=tmp_path)
        if isinstance(message, protocol.LogRecord):
            notes.append(message.message)
        elif not isinstance(message, protocol.JobProgress):
            break
    assert isinstance(message, protocol.JobResult), message
    assert any("precision bf16 -> bf16 on cpu" in note for note in notes), notes
    channel.send(protocol.ModelsStatusRequest(id="m1", models=dataclasses.asdict(tiny_models)))
    assert [engine["precision"] for engine in receive_reply(channel, tmp_path, "m1").loaded] == ["bf16"]
    request = segment_volume_request(tiny_models, volume, mask)
    request.engine["precision"] = "fp16"
    channel.send(request)
    refused = receive_reply(channel, tmp_path, request.id)
    assert isinstance(refused, protocol.ErrorReply) and refused.error_type == "InputError"
    assert "fp16 runs only on NVIDIA GPUs" in refused.message


def test_a_real_server_runs_its_precision_for_auto_and_refuses_fp16(tiny_models, tmp_path):
    server = start_server(tiny_models, tmp_path / "server", extra_args=["--precision", "bf16"])
    try:
        assert "precision bf16 -> bf16 (" in server.log()  # the start line names the choice

        def post(engine_changes):
            request = segment_volume_request(tiny_models, *box_volume(4, 40))
            request.engine.update(engine_changes)
            return httpx.post(server.url + "/v1/jobs", content=protocol.encode(request), headers=bearer(server),
                              timeout=30)

        refused = post({"precision": "fp16"})
        assert refused.status_code == 400 and "fp16 runs only on NVIDIA GPUs" in refused.text
        refused = post({"preset": "paper", "precision": "bf16"})
        assert refused.status_code == 400 and "pins precision fp32" in refused.text
        for changes, note in (({"precision": "auto"}, "precision bf16 -> bf16 on cpu"),
                              ({"preset": "paper", "precision": "auto"}, "precision fp32 -> fp32 on cpu (preset paper")):
            accepted = post(changes)
            assert accepted.status_code == 202, accepted.text
            job = accepted.json()["id"]
            for _ in range(600):
                reply = protocol.decode(httpx.get(f"{server.url}/v1/jobs/{job}", params={"wait": 1},
                                                  headers=bearer(server), timeout=40).content)
                if not isinstance(reply, protocol.JobProgress):
                    break
            assert isinstance(reply, protocol.JobResult), reply
            assert note in server.log()
    finally:
        server.stop()


def test_serve_refuses_a_precision_its_device_cannot_run_before_it_binds(tmp_path):
    from protosam.cli import serve as serve_cli

    args = serve_cli.build_parser().parse_args(["--device", "cpu", "--precision", "fp16", "--token", "t" * 24,
                                                "--port", "1"])  # port 1: binding it would fail anyway
    with pytest.raises(InputError, match="fp16 runs only on NVIDIA GPUs"):
        serve_cli.serve(args)
