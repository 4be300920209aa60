"""The small expression classifier of ECS-builtin and FD-expr-builtin: trained on the built-in
TRAINING identities (never the held-out ones the report scores), once per recipe, and cached
beside the built-in data so that later reports load it instead of training it again."""

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from reggan import config as configs
from reggan.config import Config
from reggan.datasets import builtin_spec, training_splits
from reggan.errors import RegganError
from reggan.metrics import ExpressionClassifier, train_expression_classifier
from reggan.synthetic import cache_root

log = logging.getLogger("reggan")


@dataclass(frozen=True)
class ClassifierRecipe:
    """How the classifier is trained; any change gives a different cache entry."""

    epochs: int = 5  # 95% accuracy on the held-out identities; about a minute on a 2-core CPU
    width: int = 32  # channels of the first layer
    batch_size: int = 64
    lr: float = 5e-3
    seed: int = 0


def cached_path(config: Config, recipe: ClassifierRecipe) -> Path:
    """Where the classifier for the built-in data of `config` (its identities, size and
    expressions) and `recipe` is cached."""
    spec = builtin_spec(config)
    blob = json.dumps({"data": spec.key(), "expressions": list(config.data.expressions),
                       "recipe": asdict(recipe)}, sort_keys=True).encode()
    name = hashlib.sha256(blob).hexdigest()[:16]
    return cache_root() / "expression-classifiers" / f"{name}.safetensors"


def builtin_classifier(config: Config, recipe: ClassifierRecipe = ClassifierRecipe(),
                       device="cpu") -> ExpressionClassifier:
    """The classifier of the built-in training identities of `config`'s data settings, from the
    cache or trained now (and cached). Raises RegganError when the run's expressions are not
    all built-in ones."""
    builtin = configs.from_dict(config.to_dict())
    builtin.data.path, builtin.data.heldout_subjects = configs.BUILTIN, None
    path = cached_path(builtin, recipe)
    if path.is_file():
        return ExpressionClassifier.load(path).to(device)
    train = training_splits(builtin, with_heldout=False)["train"]
    labels = [train.vocabulary[i] for i in train.labels.tolist()]
    log.info("training the expression classifier on %d images of %d built-in training "
             "identities (%d epochs; cached in %s)", len(labels), len(train.subjects),
             recipe.epochs, path)
    classifier = train_expression_classifier(
        train.images, labels, train.vocabulary, epochs=recipe.epochs, batch_size=recipe.batch_size,
        lr=recipe.lr, seed=recipe.seed, device=device, name="builtin", width=recipe.width)
    path.parent.mkdir(parents=True, exist_ok=True)
    classifier.save(path)
    return classifier


def load_classifier(path: Path, device="cpu") -> ExpressionClassifier:
    """A classifier saved by `ExpressionClassifier.save` (--expression-classifier)."""
    path = Path(path)
    if not path.is_file():
        raise RegganError(f"--expression-classifier: {path} does not exist")
    from safetensors import SafetensorError

    try:
        return ExpressionClassifier.load(path).to(device)
    except (SafetensorError, ValueError, OSError, RuntimeError) as error:
        raise RegganError(f"--expression-classifier: {path} is not an expression classifier "
                          f"saved by reggan: {str(error).splitlines()[0]}") from None
