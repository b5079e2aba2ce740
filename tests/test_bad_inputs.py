"""The bad-input corpus (issue 31): every mistake in a command line or its environment stops with exit code 2 and
one line `evoexp: error: <key or file>: ...` on stderr, no traceback, and a config mistake stops before the model
loads.

Each case is `(args, env, expected start of the message)`; args follow `model=tiny logger=none`, and `{tmp}` in
args or env stands for the test's tmp dir, which holds a regular file `file`, an empty dir `empty` and a
read-only dir `ro`. The split (CLI start-up costs about 3 s a case on 2 cores):

- CASES (in process): `evoexp.run.run_job` on the composed config, exactly what the command runs after Hydra,
  with `load_model` replaced by a failure, so a case passes only if it stops before the model loads; the error
  is reported through `evoexp.cli.one_line`, as `evoexp` does.
- CLI_CASES (the real `evoexp` command): composition errors (unknown keys and options, wrong types, bad enum
  values), the environment (EVOEXP_OUT, EVOEXP_CACHE, hydra.run.dir), missing files, and a representative
  sample of the range checks, the issue's tracebacks among them; the run dir's evoexp.log must not show the
  model loaded (`model tiny: ...` is logged right after the load).
- AFTER_LOAD_CASES (CLI): mistakes that depend on the text, so they can only be seen once the tokenizer (loaded
  with the model) has read it; they stop right after the load, before any long work.
"""
import os
import traceback

import pytest

from tests.conftest import run_cfg, run_cli

BASE = ["model=tiny", "logger=none"]
DENSE = ["method=dense", "search=none", "eval.windows=2"]
DROP = ["method=drop", "search=shortgpt", "eval.windows=2"]
EVO = ["method=drop", "search=evopress_cpu", "eval.windows=2"]
SPARSE = ["method=sparse", "search=uniform", "eval.windows=2"]
SPARSE_EVO = ["method=sparse", "search=evopress_sparse_cpu", "eval.windows=2"]
QUANT = ["method=quant", "search=uniform", "eval.windows=2"]
QUANT_EVO = ["method=quant", "search=evopress_quant_cpu", "eval.windows=2"]
STRUCT = ["method=structured", "search=uniform", "eval.windows=2"]
STRUCT_EVO = ["method=structured", "search=evopress_sparse_cpu", "eval.windows=2"]
DARWIN = ["method=structured", "search=darwinlm_cpu", "eval.windows=2"]
BONSAI = ["method=structured", "search=bonsai_cpu", "eval.windows=2"]
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
as_root = pytest.mark.skipif(IS_ROOT, reason="root ignores file permissions")

CASES = [
    # --- the tracebacks and silent acceptances ---------------------------------------------------------
    ([*DROP, "data.calib_windows=0"], {}, "data.calib_windows: expected >= 1, got 0"),
    ([*SPARSE, "database.windows=0"], {}, "database.windows: expected >= 1, got 0"),
    ([*DENSE, "model.seq_len=0"], {}, "model.seq_len: expected >= 2, got 0"),
    ([*DENSE, "eval.batch_size=0", "eval.cache_dense=false"], {}, "eval.batch_size: expected >= 1, got 0"),
    ([*DENSE, "eval.batch_size=-1", "eval.cache_dense=false"], {}, "eval.batch_size: expected >= 1, got -1"),
    ([*SPARSE, "solver.damp=-1"], {}, "solver.damp: expected >= 0, got -1"),
    ([*DENSE, "eval.seq_len=4096"], {}, "eval.seq_len: expected <= 2048 (the model's context"),
    ([*DROP, "data.seq_len=4096"], {}, "data.seq_len: expected <= 2048 (the model's context"),
    ([*EVO, "search.generations=-1"], {}, "search.generations: expected >= 0 or null, got -1"),
    ([*QUANT, "solver.group_size=-5"], {}, "solver.group_size: expected >= 0, got -5"),
    ([*EVO, "fitness=topk_kl", "fitness.topk=0"], {}, "fitness.topk: expected >= 1, got 0"),
    ([*EVO, "search.offspring=0"], {}, "search.offspring: expected >= 1, got 0"),
    ([*SPARSE_EVO, "method.num_levels=-2"], {}, "method.num_levels: expected >= 1, got -2"),
    ([*EVO, "method.target=1.5"], {}, "method.target: expected a fraction in (0, 1), got 1.5"),
    ([*EVO, "method.target=0.05"], {}, "method.target=0.05: drops 0 of 8 units"),
    ([*EVO, "method.unit=layer"], {}, "method.unit: expected one of sub_block, block, pair, got 'layer'"),
    ([*EVO, "method.droppable=[3,9]"], {}, "method.droppable: blocks [9] do not exist (the model has 8)"),
    ([*EVO, "method.droppable=[-1,2]"], {}, "method.droppable: expected block indices >= 0, got [-1, 2]"),
    ([*EVO, "search.stages=[]"], {}, "search.stages: expected at least one {survivors, tokens} stage, got []"),
    # --- the run's own keys -------------------------------------------------------------------------------------
    ([*DENSE, "seed=-1"], {}, "seed: expected >= 0, got -1"),
    ([*DENSE, "data.seed=-3"], {}, "data.seed: expected >= 0, got -3"),
    ([*DENSE, "threads=0"], {}, "threads: expected >= 1 or null, got 0"),
    ([*DENSE, "threads=-2"], {}, "threads: expected >= 1 or null, got -2"),
    ([*DENSE, "logger=wandb", "logger.mode=loud"], {}, "logger.mode: expected one of online, offline, disabled"),
    # --- the model entry ----------------------------------------------------------------------------------------
    ([*DENSE, "model.seq_len=1"], {}, "model.seq_len: expected >= 2, got 1"),
    ([*DENSE, "model.seq_len=4096"], {}, "model.seq_len: expected <= 2048 (the model's context"),
    ([*DENSE, "model.tiny.max_position_embeddings=128"], {}, "model.seq_len: expected <= 128 (the model's context"),
    ([*DENSE, "model.tiny.num_layers=0"], {}, "model.tiny.num_layers: expected >= 1, got 0"),
    ([*DENSE, "model.tiny.num_heads=3"], {}, "model.tiny.num_heads: expected a divisor of model.tiny.hidden_size=64"),
    ([*DENSE, "model.tiny.num_kv_heads=3"], {}, "model.tiny.num_kv_heads: expected a divisor of model.tiny.num_heads"),
    ([*DENSE, "model.source=onnx"], {}, "model.source: expected one of embedded, hf, tiny, got 'onnx'"),
    ([*DENSE, "model=hf", "model.path={tmp}/empty"], {}, "model.path '{tmp}/empty': directory has no config.json"),
    ([*DENSE, "model=llama3_8b"], {"HF_HUB_OFFLINE": "1"},
     "model.path 'meta-llama/Meta-Llama-3-8B': not a local directory, not in the Hugging Face cache"),
    # --- data ---------------------------------------------------------------------------------------------------
    ([*DROP, "data.calib_windows=-3"], {}, "data.calib_windows: expected >= 1, got -3"),
    ([*DROP, "data.seq_len=0"], {}, "data.seq_len: expected >= 2, got 0"),
    ([*DENSE, "data.calib=wikitext2:train"], {}, "data.calib: 'wikitext2:train' has no split 'train'"),
    ([*DENSE, "eval.datasets=[{tmp}/nope.txt]"], {}, "eval.datasets: '{tmp}/nope.txt' is neither an existing file"),
    # --- evaluation ---------------------------------------------------------------------------------------------
    ([*DENSE, "eval.windows=0"], {}, "eval.windows: expected >= 1 or null, got 0"),
    ([*DENSE, "eval.windows=-4"], {}, "eval.windows: expected >= 1 or null, got -4"),
    ([*DENSE, "eval.seq_len=1"], {}, "eval.seq_len: expected >= 2, got 1"),
    ([*DENSE, "eval.zeroshot.limit=0"], {}, "eval.zeroshot.limit: expected >= 1 or null, got 0"),
    ([*DENSE, "eval.zeroshot.batch_size=0"], {}, "eval.zeroshot.batch_size: expected >= 1, got 0"),
    ([*DENSE, "eval.zeroshot.num_fewshot=-1"], {}, "eval.zeroshot.num_fewshot: expected >= 0, got -1"),
    ([*DENSE, "eval.zeroshot.shard=3/2"], {}, 'eval.zeroshot.shard: expected "i/n" with 0 <= i < n'),
    ([*DENSE, "eval.zeroshot.bootstrap_iters=-1"], {}, "eval.zeroshot.bootstrap_iters: expected >= 0, got -1"),
    ([*DENSE, "eval.zeroshot.tasks=[arc_e]"], {}, "eval.zeroshot.tasks: 'arc_e' is not an offline task"),
    # --- fitness ------------------------------------------------------------------------------------------------
    ([*EVO, "fitness.kind=mse"], {}, "fitness.kind: expected one of kl, topk_kl, ppl, got 'mse'"),
    ([*EVO, "fitness.chunk_tokens=0"], {}, "fitness.chunk_tokens: expected >= 1, got 0"),
    ([*EVO, "fitness.report_tokens=1"], {}, "fitness.report_tokens: expected >= 2, got 1"),
    ([*EVO, "fitness.max_memory_gb=-1"], {}, "fitness.max_memory_gb: expected >= 0, got -1"),
    # --- EvoPress -----------------------------------------------------------------------------------------------
    ([*EVO, "search.stages=[{survivors:0,tokens:1024}]"], {}, "search.stages[0].survivors: expected >= 1, got 0"),
    ([*EVO, "search.stages=[{survivors:1,tokens:1024},{survivors:2,tokens:2048}]"], {},
     "search.stages[1].survivors: expected <= 1 (survivors never grow from stage to stage), got 2"),
    ([*EVO, "search.stages=[{survivors:1,tokens:1}]"], {}, "search.stages[0].tokens: expected >= 2, got 1"),
    ([*EVO, "search.stages=[{survivors:1,tokens:100000}]"], {},
     "search.stages[0].tokens: expected <= 32768 tokens (the calibration set: data.calib_windows x data.seq_len"),
    ([*EVO, "search.max_switches=0"], {}, "search.max_switches: expected >= 1, got 0"),
    ([*EVO, "search.init=best"], {}, "search.init: expected one of random, uniform, fractional, got 'best'"),
    ([*EVO, "search.init_candidates=0"], {}, "search.init_candidates: expected >= 1, got 0"),
    ([*EVO, "search.init_tokens=1"], {}, "search.init_tokens: expected >= 2, got 1"),
    ([*EVO, "search.init_tokens=40000"], {}, "search.init_tokens: expected <= 32768 tokens"),
    ([*EVO, "search.max_tries=0"], {}, "search.max_tries: expected >= 1, got 0"),
    ([*EVO, "search.max_batch=0"], {}, "search.max_batch: expected >= 1, got 0"),
    ([*EVO, "search.track_every=-1"], {}, "search.track_every: expected >= 0, got -1"),
    ([*EVO, "search.track_windows=0"], {}, "search.track_windows: expected >= 1, got 0"),
    ([*SPARSE_EVO, "search.offspring=-4"], {}, "search.offspring: expected >= 1, got -4"),
    ([*QUANT_EVO, "search.generations=-2"], {}, "search.generations: expected >= 0 or null, got -2"),
    ([*SPARSE_EVO, "+search.reference_settings={random:{candidates:0}}"], {},
     "search.reference_settings.random.candidates: expected >= 1, got 0"),
    # --- the baselines ------------------------------------------------------------------------------------------
    (["method=drop", "search=random", "search.candidates=0"], {}, "search.candidates: expected >= 1, got 0"),
    (["method=drop", "search=random", "search.tokens=1"], {}, "search.tokens: expected >= 2, got 1"),
    (["method=drop", "search=random", "search.tokens=10000000"], {}, "search.tokens: expected <= 32768 tokens"),
    (["method=drop", "search=brute", "search.max_states=0"], {}, "search.max_states: expected >= 1, got 0"),
    ([*DROP, "search.tokens=0"], {}, "search.tokens: expected >= 2, got 0"),
    (["method=sparse", "search=owl", "search.lambdas=[]"], {}, "search.lambdas: expected at least one lambda"),
    (["method=sparse", "search=owl", "search.lambdas=[-0.1]"], {}, "search.lambdas[0]: expected >= 0, got -0.1"),
    (["method=sparse", "search=owl", "search.ms=[0]"], {}, "search.ms[0]: expected > 0, got 0"),
    (["method=sparse", "search=owl", "search.tokens=1"], {}, "search.tokens: expected >= 2, got 1"),
    (["method=sparse", "search=dp", "search.resolution=0"], {}, "search.resolution: expected >= 1, got 0"),
    (["method=sparse", "search=random", "search.candidates=-1"], {}, "search.candidates: expected >= 1, got -1"),
    # --- methods ------------------------------------------------------------------------------------------------
    ([*SPARSE, "method.target=1.5"], {}, "method.target: a sparsity in [0, 1) is expected, got 1.5"),
    ([*SPARSE, "method.nm=[4,2]", "method.target=2"], {}, "method.target: a sparsity in [0, 1) is expected, got 2"),
    ([*SPARSE, "method.nm=[4,2]"], {}, "method.nm: expected [n, m] with 0 < n < m, got [4, 2]"),
    ([*SPARSE_EVO, "method.step=0"], {}, "method.step: expected >= 1 or null, got 0"),
    ([*SPARSE_EVO, "method.num_levels=0"], {}, "method.num_levels: expected >= 1, got 0"),
    ([*QUANT, "method.levels=[0,1]"], {}, "method.levels: bit-widths between 1 and 8 expected, got [0, 1]"),
    ([*QUANT_EVO, "method.levels=[2,4]"], {}, "method.levels: consecutive bit-widths are expected"),
    ([*QUANT_EVO, "method.target=9"], {},
     "method.target: expected a mean bit-width within method.levels (2 to 6), got 9"),
    ([*QUANT, "method.target=9"], {}, "method.target: search=uniform needs a whole bit-width between 1 and 8"),
    ([*QUANT_EVO, "method.group_rule=bits"], {}, "method.group_rule: expected one of size, name, none, got 'bits'"),
    ([*STRUCT, "method.target=1.2"], {},
     "method.target: expected a fraction of the decoder blocks' parameters in (0, 1), got 1.2"),
    ([*STRUCT_EVO, "method.target=0"], {},
     "method.target: expected a fraction of the decoder blocks' parameters in (0, 1), got 0"),
    ([*STRUCT, "method.budget=layers"], {}, "method.budget: expected one of group, params, got 'layers'"),
    ([*STRUCT, "method.attn_step=0"], {}, "method.attn_step: expected >= 1, got 0"),
    ([*STRUCT, "method.attn_step=3"], {}, "method.attn_step: 3 does not divide the 4 query heads of a block"),
    ([*STRUCT, "method.kv_groups=true", "method.attn_step=4"], {},
     "method.attn_step: 4 does not divide the 2 KV groups of a block"),
    ([*STRUCT, "method.mlp_step=7"], {}, "method.mlp_step: 7 neurons do not divide the MLP width 128"),
    ([*STRUCT, "method.mlp_levels=12"], {}, "method.mlp_levels: 12 equal steps do not divide the MLP width 128"),
    ([*STRUCT, "method.kv_groups=true", "model.tiny.num_kv_heads=4"], {},
     "method.kv_groups: KV-group removal needs a GQA model (the model has 4 query heads and 4 KV heads)"),
    ([*STRUCT, "export=compressed_tensors"], {},
     "export: compressed_tensors packs quantized weights and cannot hold a shrunk model"),
    ([*STRUCT, "export=gptq"], {}, "export: gptq packs quantized weights and cannot hold a shrunk model"),
    ([*STRUCT, "database.propagation=reference"], {}, "database.propagation: reference propagates a bit-width"),
    # --- database -----------------------------------------------------------------------------------------------
    ([*SPARSE, "database.windows=-1"], {}, "database.windows: expected >= 1, got -1"),
    ([*SPARSE, "database.seq_len=1"], {}, "database.seq_len: expected >= 2, got 1"),
    ([*SPARSE, "database.seq_len=4096"], {}, "database.seq_len: expected <= 2048 (the model's context"),
    ([*SPARSE, "database.batch=0"], {}, "database.batch: expected >= 1, got 0"),
    ([*SPARSE, "database.cache_gb=-1"], {}, "database.cache_gb: expected >= 0, got -1"),
    ([*SPARSE, "database.shard=[2,2]"], {}, "database.shard: expected [i, n] with 0 <= i < n, got [2, 2]"),
    ([*SPARSE, "database.propagation=sideways"], {},
     "database.propagation: expected one of auto, dense, compressed, reference, got 'sideways'"),
    ([*QUANT_EVO, "database.reference_level=7"], {},
     "database.reference_level: expected one of the levels [2, 3, 4, 5, 6]"),
    ([*QUANT_EVO, "database.propagation=compressed", "method.target=3.5"], {},
     "method.target: expected one of the levels [2, 3, 4, 5, 6]"),
    ([*SPARSE_EVO, "database.true_sequential=true"], {}, "database.true_sequential: needs propagation compressed"),
    ([*SPARSE, "database.dir={tmp}/file/db"], {}, "database.dir: expected a writable directory, got {tmp}/file/db"),
    # --- solvers ------------------------------------------------------------------------------------------------
    ([*SPARSE, "solver.blocksize=0"], {}, "solver.blocksize: expected >= 1, got 0"),
    ([*SPARSE, "solver.bits=12"], {}, "solver.bits: expected a bit-width between 1 and 8 or null, got 12"),
    ([*SPARSE, "solver.group_size=-1"], {}, "solver.group_size: expected >= 0, got -1"),
    ([*QUANT, "solver.damp=-0.5"], {}, "solver.damp: expected >= 0, got -0.5"),
    ([*QUANT, "solver.blocksize=-8"], {}, "solver.blocksize: expected >= 1, got -8"),
    ([*QUANT, "solver=rtn", "solver.group_size=-1"], {}, "solver.group_size: expected >= 0, got -1"),
    ([*SPARSE, "solver=fista", "solver.tol=-1"], {}, "solver.tol: expected >= 0, got -1"),
    ([*SPARSE, "solver=fista", "solver.iters=-1"], {}, "solver.iters: expected >= 0, got -1"),
    ([*SPARSE, "solver=fista", "solver.damp=-1"], {}, "solver.damp: expected >= 0, got -1"),
    ([*SPARSE, "solver=fista", "solver.ratio=1.5"], {}, "solver.ratio: expected a share between 0 and 1, got 1.5"),
    # --- what already was one line (guarded here) ---------------------------------------------------------------
    ([*DENSE, "export=hf"], {}, "export: method=dense writes no model"),
    ([*DROP, "export=gptq"], {}, "export: method=drop exports as hf, not gptq"),
    ([*DROP, "search.references=[random]"], {}, "search.references: 'random' is not a depth baseline"),
    (["method=sparse", "search=shortgpt"], {}, "search: 'shortgpt' does not apply to method=sparse"),
    (["method=quant", "search=owl"], {}, "search: owl allocates sparsity"),
    ([*SPARSE, "solver=gptq"], {}, "solver: 'gptq' does not apply to method=sparse"),
    ([*STRUCT, "solver=sparsegpt"], {}, "solver: 'sparsegpt' does not apply to method=structured (choose one of "
                                        "ziplm, wanda_sp, magnitude, random)"),
    ([*SPARSE, "solver=ziplm"], {}, "solver: 'ziplm' does not apply to method=sparse"),
    ([*QUANT, "solver=wanda_sp"], {}, "solver: 'wanda_sp' does not apply to method=quant"),
    (["method=structured", "search=owl"], {}, "search: owl allocates sparsity; it does not apply to method=structured"),
    (["method=structured", "search=shortgpt"], {}, "search: 'shortgpt' does not apply to method=structured"),
    # --- search=darwinlm ----------------------------------------------------------------------------------------
    (["method=sparse", "search=darwinlm_cpu"], {}, "search: darwinlm fine-tunes candidates whose heads and neurons "
                                                   "are removed; it needs method=structured, not method=sparse"),
    (["method=drop", "search=darwinlm"], {}, "search: 'darwinlm' does not apply to method=drop"),
    ([*DARWIN, "search.lr=0"], {}, "search.lr: expected > 0, got 0"),
    ([*DARWIN, "search.lr=-1e-5"], {}, "search.lr: expected > 0, got -1e-05"),
    ([*DARWIN, "search.stages=[{survivors:1,tokens:512,train_tokens:0}]"], {},
     "search.stages[0].train_tokens: expected >= 1, got 0"),
    ([*DARWIN, "search.train_windows=1"], {},
     "search.stages[1].train_tokens: 2048 exceeds the training text, search.train_windows x data.seq_len = 1 x 1024 "
     "= 1024 tokens (raise search.train_windows)"),
    ([*DARWIN, "search.train_batch=0"], {}, "search.train_batch: expected >= 1, got 0"),
    # --- train= (post-compression training) ----------------------------------------------------------------------
    ([*QUANT, "train=finetune"], {}, "train: a method=quant model holds integer codes, which evoexp does not train; "
                                     "use train=none"),
    ([*DENSE, "train=distill"], {}, "train: post-compression training is for a compressed model (method=sparse, "
                                    "structured or drop), not method=dense (use train=none)"),
    ([*DROP, "train=distill", "train.batch=0"], {}, "train.batch: expected >= 1, got 0"),
    ([*STRUCT, "train=finetune", "train.lr=0"], {}, "train.lr: expected > 0, got 0"),
    ([*SPARSE, "train=finetune", "train.tokens=0"], {}, "train.tokens: expected >= 1, got 0"),
    ([*STRUCT, "train=distill", "train.warmup=1.5"], {}, "train.warmup: expected a fraction of the steps in [0, 1), "
                                                         "got 1.5"),
    ([*STRUCT, "train=finetune", "train.schedule=step"], {}, "train.schedule: expected one of cosine, linear, "
                                                             "constant, got 'step'"),
    ([*STRUCT, "train.kind=lora"], {}, "train: expected one of none, finetune, distill, got 'lora'"),
    ([*SPARSE, "train=finetune", "train.lora.rank=8"], {}, "train.lora.rank: a LoRA update is dense and cannot keep "
                                                           "a method=sparse model's zeros; use train.lora.rank=0"),
    ([*STRUCT, "train=distill", "train.lora.rank=-1"], {}, "train.lora.rank: expected >= 0, got -1"),
    ([*STRUCT, "train=distill", "train.lora.rank=8", "train.lora.alpha=0"], {},
     "train.lora.alpha: expected > 0, got 0"),
    ([*DROP, "train=finetune", "train.lora.rank=8", "train.lora.dropout=1"], {},
     "train.lora.dropout: expected a probability in [0, 1), got 1"),
    # --- search=bonsai -------------------------------------------------------------------------------------------
    ([*BONSAI, "search.prune_frac=0.5"], {}, "search.prune_frac: expected a fraction in (0, 0.5) (each round's "
                                              "candidates are 2 x prune_frac), got 0.5"),
    ([*BONSAI, "search.prune_frac=0"], {}, "search.prune_frac: expected a fraction in (0, 0.5)"),
    ([*BONSAI, "search.sub_models=4"], {}, "search.sub_models: expected >= search.folds = 5 (each fold needs a "
                                           "held-out sub-model), got 4"),
    ([*BONSAI, "search.prior=fisher"], {}, "search.prior: expected one of wanda_sp, magnitude, random, got 'fisher'"),
    (["method=sparse", "search=bonsai_cpu", "eval.windows=2"], {},
     "search: bonsai removes heads and neurons; it needs method=structured, not method=sparse"),
    (["method=drop", "search=bonsai_cpu", "eval.windows=2"], {}, "search: 'bonsai' does not apply to method=drop"),
    ([*BONSAI, "method.budget=params"], {}, "method.budget: search=bonsai removes p of the heads and p of the "
                                            "neurons each round"),
    ([*BONSAI, "export=gptq"], {}, "export: gptq packs quantized weights and cannot hold a shrunk model"),
    # --- the environment ----------------------------------------------------------------------------------------
    ([*DENSE], {"EVOEXP_CACHE": "{tmp}/file/cache"},
     "EVOEXP_CACHE: expected a writable directory, got {tmp}/file/cache ({tmp}/file is a file)"),
    ([*DENSE], {"EVOEXP_CACHE": "{tmp}/file"}, "EVOEXP_CACHE: expected a writable directory, got {tmp}/file (not a"),
    pytest.param([*DENSE], {"EVOEXP_CACHE": "{tmp}/ro"}, "EVOEXP_CACHE: expected a writable directory, got {tmp}/ro",
                 marks=as_root),
    pytest.param([*DENSE], {"EVOEXP_CACHE": "{tmp}/ro/cache"},
                 "EVOEXP_CACHE: expected a writable directory, got {tmp}/ro/cache", marks=as_root),
]

CLI_CASES = [
    # composition: unknown keys and options, wrong types, bad enum values
    ([*DENSE, "eval.windws=2"], {}, "eval.windws: Key 'windws' not in 'EvalCfg'"),
    ([*DENSE, "seedd=1"], {}, "seedd: Key 'seedd' not in 'RunCfg'"),
    ([*DENSE, "eval.windows=abc"], {}, "eval.windows: Value 'abc' of type 'str' could not be converted to Integer"),
    ([*DENSE, "resume=maybe"], {}, "resume: Value 'maybe' is not a valid bool"),
    ([*DENSE, "device=tpu"], {}, "device: Invalid value 'tpu', expected one of [auto, cpu, cuda]"),
    ([*DENSE, "dtype=int8"], {}, "dtype: Invalid value 'int8', expected one of [float32, bfloat16, float16, auto]"),
    (["method=prune"], {}, "In 'config': Could not find 'method/prune'"),
    (["model=gpt5", *DENSE], {}, "In 'config': Could not find 'model/gpt5'"),
    # missing files
    ([*DENSE, "data=text_file", "data.calib=/nope.txt", "data.eval=/nope.txt"], {},
     "data.calib: '/nope.txt' is neither an existing file"),
    ([*DENSE, "model=/nope/checkpoint"], {}, "model.path '/nope/checkpoint': no such checkpoint directory"),
    # the environment
    ([*DENSE], {"EVOEXP_OUT": "{tmp}/file"},
     "EVOEXP_OUT: expected a directory where run dirs can be written, got {tmp}/file (Not a directory"),
    pytest.param([*DENSE], {"EVOEXP_OUT": "{tmp}/ro"},
                 "EVOEXP_OUT: expected a directory where run dirs can be written, got {tmp}/ro", marks=as_root),
    ([*DENSE, "hydra.run.dir={tmp}/file"], {},
     "hydra.run.dir: expected a directory where run dirs can be written, got {tmp}/file"),
    ([*DENSE], {"EVOEXP_CACHE": "{tmp}/file/cache"},
     "EVOEXP_CACHE: expected a writable directory, got {tmp}/file/cache ({tmp}/file is a file)"),
    # the tracebacks, through the command
    ([*DROP, "data.calib_windows=0"], {}, "data.calib_windows: expected >= 1, got 0"),
    ([*SPARSE, "database.windows=0"], {}, "database.windows: expected >= 1, got 0"),
    ([*DENSE, "model.seq_len=0"], {}, "model.seq_len: expected >= 2, got 0"),
    ([*DENSE, "eval.batch_size=-1", "eval.cache_dense=false"], {}, "eval.batch_size: expected >= 1, got -1"),
    ([*SPARSE, "solver.damp=-1"], {}, "solver.damp: expected >= 0, got -1"),
    ([*EVO, "search.offspring=0"], {}, "search.offspring: expected >= 1, got 0"),
    ([*SPARSE_EVO, "method.num_levels=-2"], {}, "method.num_levels: expected >= 1, got -2"),
    ([*DENSE, "eval.seq_len=4096"], {}, "eval.seq_len: expected <= 2048 (the model's context"),
    ([*STRUCT, "method.kv_groups=true", "model.tiny.num_kv_heads=4"], {},
     "method.kv_groups: KV-group removal needs a GQA model (the model has 4 query heads and 4 KV heads)"),
    ([*SPARSE, "solver=ziplm"], {}, "solver: 'ziplm' does not apply to method=sparse"),
]

AFTER_LOAD_CASES = [
    ([*DENSE[:2], "eval.windows=100000"], {}, "eval.windows: 100000 requested but wikitext2:test has"),
    ([*DENSE[:2], "data=text_file", "data.calib={tmp}/short.txt", "data.eval={tmp}/short.txt"], {},
     "{tmp}/short.txt: 3 tokens, fewer than one window of 256"),
    # what whole heads can remove is counted in the loaded model's parameters (biases and norms included)
    ([*STRUCT, "method.target=0.7"], {},
     "method.target: 0.7 removes 69,632 attn parameters, more than the removable heads hold (65,536"),
    ([*STRUCT, "train=distill", "train.lora.rank=4", "train.lora.targets=[q_proj,qkv_proj]"], {},
     "train.lora.targets: qkv_proj is not a linear layer of this model's blocks (it has down_proj, gate_proj, "
     "k_proj, o_proj, q_proj, up_proj, v_proj)"),
]


@pytest.fixture
def places(tmp_path):
    """{tmp}: a regular file, an empty dir, a read-only dir and a 3-byte text file."""
    (tmp_path / "file").write_text("not a directory\n")
    (tmp_path / "empty").mkdir()
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o500)
    (tmp_path / "short.txt").write_text("abc")
    yield tmp_path
    (tmp_path / "ro").chmod(0o700)


def fill(value, tmp):
    return value.replace("{tmp}", str(tmp))


def _ident(case) -> str:
    args, env, _ = case.values if hasattr(case, "values") else case
    return " ".join([*[f"{k}={v}" for k, v in env.items()], *args])


@pytest.mark.parametrize("args, env, expected", CASES, ids=[_ident(c) for c in CASES])
def test_bad_input_in_process(args, env, expected, places, compose, monkeypatch):
    import evoexp.run
    from evoexp.cli import one_line

    for key, value in env.items():
        monkeypatch.setenv(key, fill(value, places))
    monkeypatch.setattr(evoexp.run, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    run_dir = places / "run"
    try:
        cfg = compose([*BASE, *(fill(a, places) for a in args)], output_dir=str(run_dir))
        evoexp.run.run_job(_without_hydra(cfg), run_dir)
    except Exception as ex:  # noqa: BLE001 - reported as the command reports it
        message = one_line(ex)
        assert message is not None, "".join(traceback.format_exception(ex))
    else:
        pytest.fail("the job ran")
    assert "\n" not in message
    assert message.startswith(fill(expected, places)), message
    assert not (run_dir / "progress_config.json").exists()  # nothing written to the run dir


def _without_hydra(cfg):
    from omegaconf import open_dict

    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.pop("hydra", None)
    return cfg


def _cli(args, env, places):
    args = [fill(a, places) for a in args]
    env = {k: fill(v, places) for k, v in env.items()}
    run_dir = places / "run"
    if "EVOEXP_OUT" not in env and not any(a.startswith("hydra.run.dir=") for a in args):
        args.append(f"hydra.run.dir={run_dir}")
    return run_cli(*BASE, *args, env=env), run_dir


def _assert_one_line(out, expected, places) -> None:
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    assert lines and lines[-1].startswith("evoexp: error: " + fill(expected, places)), out.stderr[-3000:]
    assert len(lines) == 1, out.stderr[-3000:]  # nothing else: no warning, no log line, no second error


@pytest.mark.parametrize("args, env, expected", CLI_CASES, ids=[_ident(c) for c in CLI_CASES])
def test_bad_input_on_the_command_line(args, env, expected, places):
    out, run_dir = _cli(args, env, places)
    _assert_one_line(out, expected, places)
    logs = list(places.glob("**/evoexp.log"))
    assert not any("model tiny:" in p.read_text() for p in logs), "the model was loaded"


@pytest.mark.parametrize("args, env, expected", AFTER_LOAD_CASES, ids=[_ident(c) for c in AFTER_LOAD_CASES])
def test_bad_input_seen_right_after_the_load(args, env, expected, places):
    out, run_dir = _cli(args, env, places)
    _assert_one_line(out, expected, places)
    assert "model tiny:" in (run_dir / "evoexp.log").read_text()  # the text is read with the model's tokenizer
    assert not (run_dir / "result.json").exists()


def test_the_corpus_is_large_enough():
    assert len(CASES) + len(CLI_CASES) + len(AFTER_LOAD_CASES) >= 80


def test_run_cfg_of_a_good_config_passes_every_check(compose):
    """The checks reject nothing the shipped configs hold: every method and search option on the tiny model."""
    from evoexp.recipes.checks import check_run
    from evoexp.recipes.registry import recipe_for

    for args in (DENSE, DROP, EVO, SPARSE, SPARSE_EVO, QUANT, QUANT_EVO, ["method=drop", "search=evopress"],
                 ["method=drop", "search=random"], ["method=drop", "search=brute"], ["method=sparse", "search=owl"],
                 ["method=sparse", "search=dp"], ["method=quant", "search=evopress_quant"],
                 ["method=sparse", "search=evopress_sparse"], ["method=sparse", "solver=fista"],
                 ["method=quant", "solver=rtn"], ["method=quant", "method.target=2.5", "search=evopress_quant_cpu"],
                 STRUCT, STRUCT_EVO, ["method=structured", "search=dp"], ["method=structured", "search=random"],
                 ["method=structured", "method.budget=params", "method.kv_groups=true", "solver=wanda_sp"],
                 ["method=structured", "solver=magnitude", "method.mlp_step=32", "export=auto"],
                 DARWIN, ["method=structured", "search=darwinlm"], [*DARWIN, "train=distill"],
                 [*SPARSE, "train=finetune"], [*DROP, "train=distill", "export=auto"],
                 [*STRUCT, "train=distill", "export=auto"], BONSAI,
                 [*BONSAI, "search.perturb=false", "train=distill", "export=auto"]):
        rc = run_cfg(compose([*BASE, *args]))
        check_run(rc)
        recipe_for(rc.method.kind).validate(rc)


@pytest.mark.parametrize("key", ["eval.seq_len", "data.seq_len"])
def test_the_embedded_models_context_is_checked_before_its_first_conversion(key, places, compose, monkeypatch):
    """Before the embedded model is converted (an empty cache), its GGUF's header gives the context length."""
    import evoexp.run
    from evoexp.cli import one_line

    monkeypatch.setenv("EVOEXP_CACHE", str(places / "empty"))
    monkeypatch.setattr(evoexp.run, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    cfg = compose(["model=smollm2_135m", "logger=none", *DENSE, f"{key}=9000"], output_dir=str(places / "run"))
    with pytest.raises(Exception) as raised:
        evoexp.run.run_job(_without_hydra(cfg), places / "run")
    assert one_line(raised.value) == f"{key}: expected <= 8192 (the model's context, max_position_embeddings), got 9000"
    assert not any((places / "empty").iterdir()), "nothing is converted or cached for a refused run"


def test_an_uncached_hub_models_context_comes_from_its_config_alone(places, monkeypatch):
    """A Hub model not in the HF cache: its config.json is fetched alone (where the Hub is reachable) so that
    window lengths are checked before the weights are downloaded; offline nothing is fetched and nothing checked."""
    import huggingface_hub

    import evoexp.models.peek as peek
    from evoexp.config import ModelCfg

    config = places / "config.json"
    config.write_text('{"max_position_embeddings": 4096, "num_hidden_layers": 32}')
    fetched = []
    monkeypatch.setattr(peek, "hub_config", lambda m: None)  # not in the HF cache
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(peek, "hub_reachable", lambda: True)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo, name, **kw: fetched.append(name) or config)
    model = ModelCfg(source="hf", path="some-org/some-model")
    assert (peek.peek_context(model), peek.peek_blocks(model), fetched) == (4096, 32, ["config.json"])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert peek.peek_context(model) is None
