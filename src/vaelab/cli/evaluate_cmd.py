"""`vaelab evaluate`: ELBO and importance-weighted log-likelihood of a run on its test set."""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from vaelab.cli import add_json_flag, example, is_terminal, print_json, seed, shown


def add_parser(sub) -> None:
    p = sub.add_parser(
        "evaluate",
        help="measure a trained model: ELBO and log-likelihood (IWAE bound) on the test set",
        description=(
            "Score the run's model on its data source's test set. A Bernoulli model (the seed's)\n"
            "is scored on the test images binarized once with a fixed seed (the same images for\n"
            "every model, whatever it was trained on); a continuous-Bernoulli or Gaussian model on\n"
            "the grey levels themselves (nats of a density: compare only within one likelihood).\n"
            "  ELBO = -(reconstruction + KL), nats per image;\n"
            "  NLL = -IWAE_K, an upper bound on -log p(x) from K importance samples per image\n"
            "  (Burda et al. 2015), in nats and bits/dim, with standard errors over images;\n"
            "  active latent dimensions (variance of the posterior mean over images > 0.01).\n"
            "--disentanglement (data with known factors: --data dsprites) adds MIG and the\n"
            "FactorVAE score of the posterior means, with the estimator's choices.\n"
            "Writes RUN/evaluation.json."
        ),
        epilog=example(
            "vaelab evaluate runs/seed\n"
            "vaelab evaluate runs/seed --importance-samples 100 --limit 1000 --json\n"
            "vaelab evaluate runs/dsprites-b4 --disentanglement"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run_dir", metavar="RUN", help="a run directory written by vaelab train")
    p.add_argument(
        "-k",
        "--importance-samples",
        type=int,
        default=5000,
        metavar="K",
        help="importance samples per image (default 5000, as in the IWAE paper)",
    )
    p.add_argument("--limit", type=int, metavar="N", help="evaluate only the first N test images")
    p.add_argument("--seed", type=seed, default=0, help="seed of the importance samples (default 0)")
    p.add_argument(
        "--device", choices=["auto", "cpu", "cuda", "mps"], default="auto", help="where to run (auto)"
    )
    p.add_argument(
        "--disentanglement", action="store_true",
        help="also MIG and the FactorVAE score (data with known factors, such as dsprites)",
    )
    add_json_flag(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import vaelab
    from vaelab import runs
    from vaelab.config import MAX_UNITS
    from vaelab.devices import pick_device
    from vaelab.errors import ConfigError, RunError
    from vaelab.evaluate import EVALUATION, evaluate, write_evaluation

    k, limit = args.importance_samples, args.limit
    if not 1 <= k <= MAX_UNITS:  # a typo's 10**23 would run for ever (K = 5000 is the standard)
        raise ConfigError(f"option --importance-samples: must be in [1, {MAX_UNITS:,}], got {k}")
    if limit is not None and limit < 1:
        raise ConfigError(f"option --limit: must be at least 1, got {limit}")
    model = vaelab.load(args.run_dir, device=pick_device(args.device))
    # the result goes into RUN/evaluation.json: a run that cannot take it is refused now, not after
    # minutes of work (an unwritable folder, a folder named evaluation.json)
    if not os.access(args.run_dir, os.W_OK | os.X_OK):
        raise RunError(f"{args.run_dir}: no permission to write in it, where vaelab writes {EVALUATION}")
    runs.refuse_if_not_a_file(Path(args.run_dir) / EVALUATION, EVALUATION)
    data = model.run_config.data
    dataset = runs.load_run_data(model)
    if args.disentanglement and model.config.conditional:
        raise ConfigError("option --disentanglement: a conditional model's codes depend on the label; "
                          "score an unconditional one")
    if args.disentanglement and dataset.factor_names is None:
        raise ConfigError(
            f"option --disentanglement: this run's data ({Path(data.source).name}) has no known factors "
            "(dsprites has)"
        )
    n = len(dataset.x_test) if limit is None else min(limit, len(dataset.x_test))

    bar = None
    if is_terminal():
        from tqdm import tqdm

        bar = tqdm(total=n, desc=f"evaluate K={k}", unit="img", leave=False, file=sys.stderr)
    try:
        result = evaluate(model, dataset, k=k, limit=limit, seed=args.seed,
                          progress=bar.update if bar is not None else None)
    finally:
        if bar is not None:
            bar.close()
    if not (math.isfinite(result["nll"]) and math.isfinite(result["elbo"])):
        raise RunError(f"{args.run_dir}/{runs.WEIGHTS}: the model gives NaN or infinite log-likelihoods")
    result = {"run_dir": str(args.run_dir), "data": data.source, "trained_binarization": data.binarize,
              **result}
    if args.disentanglement:
        from vaelab.disentanglement import disentanglement

        result["disentanglement"] = disentanglement(model, dataset, seed=args.seed)
    try:
        path = write_evaluation(args.run_dir, result)
    except RunError:  # (a disk that filled meanwhile): the numbers are shown before the error
        print(shown(_summary(result, None), lines=True), file=sys.stderr)
        raise
    if args.json:
        print_json(result)
    else:
        print(shown(_summary(result, path), lines=True))
    return 0


def _summary(r: dict, path) -> str:
    def pm(value, stderr) -> str:
        return f"{value:.2f}" + (f" ± {stderr:.2f}" if stderr is not None else "")

    if r["binarization"] is not None:
        images = f"binarized (seed {r['binarization']['seed']})"
    else:
        images = f"grey levels ({r['likelihood']} likelihood: nats of a density)"
    lines = [
        f"{r['run_dir']}: {r['n_images']} test images, {images}, "
        f"K = {r['k']} importance samples (seed {r['seed']}), {r['seconds']:.1f}s on {r['device']}",
        f"  ELBO      {pm(r['elbo'], r['elbo_stderr'])} nats = -(recon {r['recon']:.2f} + KL {r['kl']:.2f})",
        f"  NLL      <= {pm(r['nll'], r['nll_stderr'])} nats  ({r['bits_per_dim']:.4f} bits/dim; "
        f"log p(x) >= {r['log_px']:.2f})",
        f"  active latent dims: {r['active_dims']} of {r['latent_dim']}"
        if r["active_dims"] is not None
        else "  active latent dims: not measured (it needs two or more images)",
    ]
    if "disentanglement" in r:
        d = r["disentanglement"]
        m, f = d["mig"], d["factorvae"]
        lines.append(
            f"  disentanglement: MIG {m['mig']:.3f} ({m['bins']} bins, {m['images']} images); "
            f"FactorVAE score {f['factorvae']:.3f} ({f['votes']} votes of {f['batch']} images)"
        )
    if r.get("trained_binarization") == "none" and r["binarization"] is not None:
        lines.append("  (trained on grey levels: these are likelihoods of binarized test images)")
    if path is not None:
        lines.append(f"wrote {path}")
    return "\n".join(lines)
