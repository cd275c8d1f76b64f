"""`mm-teamlora compare COMPARE.yaml`: TeamLoRA against LoRA, MoELoRA and HydraLoRA at matched
trainable parameters, the same optimizer steps and the same seeds, on one mixture (issue 17).

The base run (a run YAML, e.g. data_configs/runs/demo_teamlora.yaml) is the reference: its adapter's
method, rank and experts set the trainable-parameter count every other method is matched to.
Phases (each run skipped when its output is already there; see "Resuming"):
1. plan: the layer shapes of the base model give each method the rank whose adapter count is
   closest to the reference's (`adapters.matching`); every configuration is then built with the
   very `train.engine.build_model` training uses and its trainable parameters counted (plan.json);
   each method's alpha gives it the reference's update gain at uniform routing (TEAMLORA.md 4b),
   times the alpha-grid multiplier chosen in phase 2 (`alpha_policy: same` keeps the base alpha);
2. alpha grid (when `alpha_grid` is given): each method at each multiplier, at the first seed,
   scored by the answer-token loss (mean -log p of the right option's letter, likelihood) on the
   validation TSV carved from the training side; the lowest loss wins (never the eval TSV);
3. training: every method x seed, then the ablations at the first seed, through the same code as
   `mm-teamlora train --nproc N` (`train.launch`; in this process when nproc is 1). Each run gets
   `seed=S` (data order, dropout, and the adapter's initialisation through `adapter.seed`) and
   `optim.max_minutes=null`: the same optimizer steps (the base run's schedule) for everyone,
   never a time budget. With `binding_steps` each run first trains its own binding stage, the main
   job's (`demo.binding_stage_overrides`: the binding mixture, e.g. the demo's binding.yaml, at a
   constant rate until the answer loss on `binding_val` held-out records falls to the target, at
   most `binding_steps`), with the run's adapter and seed, and its steps continue from that stage's
   checkpoint: every method then learns the task from the same footing, answering by letter;
4. evaluation, only once every run has trained: every run's final checkpoint on the eval TSV
   (likelihood, CircularEval), and the routing report (JS divergence and mutual information of
   router probabilities between image and text tokens) of the routed methods;
5. reports: compare.json, compare.md and compare.png in `out` (vanilla and circular accuracy
   mean +- std over seeds with chance, per category, trainable parameters, tokens/s and training
   time as ratios to LoRA, peak memory, routing separation, grid and ablations; whether
   differences lie inside the seed spread is said for each).

Layout: OUT/compare_config.yaml, OUT/plan.json, OUT/runs/<label>-a<multiplier>-s<seed>/
{settings.json, sittings.json, binding/, train/, eval/, routing/, val/} (a grid run at the chosen multiplier
is the main run of its method's first seed: the same folder, trained once), OUT/compare.json,
OUT/compare.md, OUT/compare.png.

Resuming: a run whose final checkpoint says `finished` is never trained again; one with
checkpoints continues with `--resume auto`; a folder without any restarts (`--overwrite`). An
evaluation whose report was made from the same checkpoint, data and limit is reused. A run folder
made with other settings (its resolved run config differs) is an error: nothing is overwritten.

Ablations (`ablations:`, each one run at the first seed, compared with the main TeamLoRA run of
that seed): `no_competition` (TeamLoRA without M), `group_routing_off` / `group_routing_on`
(whichever differs from the base run), `k2`, `k8` (TeamLoRA with 2 / 8 experts at the same total
rank, alpha for the same gain), `moelora_loop` (MoELoRA in its published one-matmul-per-expert
form beside the fused one: how much of TeamLoRA's speed is the fusion).

The causal masking test (`eval.ablation`): for every routed run, the `masking_experts` (1) experts
image tokens prefer (per layer) are masked, then the text-preferred ones, then as many chosen at
random (`masking_draws` (3) draws, seeds `masking_seed` (0), +1, ...: the control, its mean and
spread), and the answer loss on image and on text-only questions is measured against the unmasked
model (compare.md, "Expert masking"; a line per routed method in the printed table; cached in
routing/ablation.json while the checkpoint, data and those three settings agree). The recipe logs
its progress; the CLI prints.

Modules, one phase or one idea each: `config` (CompareConfig, its checks and YAML round trip, the
errors), `plan` (matched ranks and alphas, plan.json, the runs and their folders), `runs` (training one
run: settings, resuming, sittings), `evaluation` (the grid's validation score, the final evaluation),
`summary` (compare.json's content and the seed-spread verdicts), `report` (compare.json, compare.md,
compare.png), `recipe` (`run_compare` and the table the CLI prints), `progress` (how far a comparison
has got, from its folder alone: `mm-teamlora compare --status`). This package re-exports what the
CLI and the tests use.
"""

from .config import (ABLATIONS, ALPHA_POLICIES, METHODS, PATH_KEYS, REPO_ROOT, ROUTED, CompareConfig,
                     CompareConfigError, CompareError)
from .evaluation import answer_loss, evaluate_run, score_on_val
from .plan import PLAN_VERSION, RunSpec, plan
from .progress import CompareProgress, RunProgress, compare_progress, format_progress
from .recipe import CompareResult, format_table, run_compare
from .report import format_markdown, plot, write_reports
from .runs import is_finished, train_run, training_figures
from .summary import summarise, verdict

__all__ = ["ABLATIONS", "ALPHA_POLICIES", "METHODS", "PATH_KEYS", "PLAN_VERSION", "REPO_ROOT", "ROUTED",
           "CompareConfig", "CompareConfigError", "CompareError", "CompareProgress", "CompareResult", "RunProgress",
           "RunSpec", "answer_loss", "compare_progress", "evaluate_run", "format_markdown", "format_progress",
           "format_table", "is_finished", "plan", "plot", "run_compare",
           "score_on_val", "summarise", "train_run", "training_figures", "verdict", "write_reports"]
