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
  evaluate    L1 / PSNR / SSIM against paired targets

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
    parser.add_argument("--device", metavar="DEV", help="auto, cpu, cuda or cuda:N "
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
                    "and write demo_grid.png, samples/, evaluation/, run/ and report.md into the "
                    "output folder. Sized for about 5 minutes on an idle 2-core CPU with the demo's defaults "
                    "(model.gen_width=16, train.steps=300, otherwise the config defaults "
                    "below); overrides train longer or change the model.")
    p.add_argument("--out", default="reggan-demo", metavar="DIR",
                   help="output folder (default: reggan-demo)")
    p.add_argument("-c", "--config", metavar="FILE", help="YAML or JSON config file")
    p.add_argument("-o", "--set", dest="overrides", metavar="KEY=VALUE", action="append",
                   default=[], help="override a config key (repeatable)")
    p.add_argument("--steps", type=int, metavar="N", help="training steps (default 300)")
    p.add_argument("--device", metavar="DEV", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--detector", default="auto", choices=("auto", "opencv", "skimage"),
                   help="face detector for the astronaut photo (default: auto)")
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
         "ridge loss instead) and save the model. `reggan train --stage1 RUN` can start from it."),
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
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    _common(p)

    p = commands.add_parser(
        "evaluate", help="metrics against paired targets", formatter_class=_Formatter,
        description="Score models on pairs: by default each model's own held-out data (for "
                    "the built-in data, the held-out identities and every out-of-distribution "
                    "variant). Reports the model's output, its regression stage, and the "
                    "unchanged input as a reference. Writes metrics.json, metrics.md and a grid "
                    "per split.")
    p.add_argument("--model", required=True, nargs="+", metavar="RUN",
                   help="one or more run folders or model files (e.g. ablations)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--data", metavar="PATH",
                   help="'builtin' or a paired dataset to score on (default: the model's own "
                        "held-out data)")
    p.add_argument("--metrics", nargs="+", default=["l1", "psnr", "ssim"], metavar="NAME",
                   help="metrics (default: l1 psnr ssim)")
    p.add_argument("--batch-size", type=int, default=32, help="pairs per batch (default 32)")
    p.add_argument("--max-subjects", type=int, metavar="N",
                   help="score only the first N subjects of each split (default: all)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    _common(p)
    return parser


def _overrides(args) -> List[str]:
    overrides = list(args.overrides)
    for flag, key in (("data", "data.path"), ("mode", "model.mode"), ("steps", "train.steps"),
                      ("device", "train.device"), ("seed", "train.seed")):
        value = getattr(args, flag, None)
        if value is not None:
            overrides.append(f"{key}={value}")
    if getattr(args, "strict", False):
        overrides.append("data.strict=true")
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
    if fit_only and config.model.mode == "refinement":
        raise RegganError("model.mode=refinement has no regression stage to fit")
    run(config, Path(args.out), overwrite=args.overwrite, resume=getattr(args, "resume", False),
        stage1=Path(args.stage1) if getattr(args, "stage1", None) else None, fit_only=fit_only,
        progress=not args.quiet)
    log.info("run written to %s", args.out)


def dispatch(args) -> None:
    if args.command == "demo":
        from reggan.demo import demo

        overrides = list(args.overrides)
        if args.steps is not None:
            overrides.append(f"train.steps={args.steps}")
        if args.device is not None:
            overrides.append(f"train.device={args.device}")
        demo(Path(args.out), overrides, args.config, args.overwrite, args.detector,
             progress=not args.quiet)
    elif args.command == "prepare":
        from reggan.io import staged_output
        from reggan.prepare import prepare_folder

        if args.size < 8:
            raise RegganError(f"--size must be at least 8, got {args.size}")
        with staged_output(Path(args.out), args.overwrite) as scratch:
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
        from reggan.evaluate import evaluate

        results = evaluate([Path(m) for m in args.model], Path(args.out), args.data,
                           args.metrics, args.batch_size, args.device, args.strict,
                           args.overwrite, args.max_subjects)
        if not args.quiet:
            from reggan.evaluate import _markdown

            print(_markdown(results, args.metrics), end="")


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
