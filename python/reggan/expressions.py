"""Expression vocabulary: canonical names, synonyms and CFEE's compound categories."""

import re
from typing import Dict, Iterable, List, Optional, Sequence

from reggan.errors import RegganError

DEFAULT_EXPRESSIONS = ("neutral", "happy", "sad", "fearful", "angry", "surprised", "disgusted")

# CFEE (Du, Tao and Martinez, PNAS 2014): neutral, the six basic and fifteen compound categories,
# in the order the paper lists them. Numeric category codes in file names (1-22) follow it.
CFEE_EXPRESSIONS = DEFAULT_EXPRESSIONS + (
    "happily_surprised", "happily_disgusted", "sadly_fearful", "sadly_angry", "sadly_surprised",
    "sadly_disgusted", "fearfully_angry", "fearfully_surprised", "fearfully_disgusted",
    "angrily_surprised", "angrily_disgusted", "disgustedly_surprised", "appalled", "hatred", "awed",
)

_SYNONYMS = {
    "neutrality": "neutral", "ne": "neutral", "af": "fearful",
    "happiness": "happy", "joy": "happy", "ha": "happy",
    "sadness": "sad", "sa": "sad",
    "fear": "fearful", "afraid": "fearful", "fe": "fearful",
    "anger": "angry", "an": "angry",
    "surprise": "surprised", "su": "surprised",
    "disgust": "disgusted", "di": "disgusted",
}


def normalize(name: str) -> str:
    """Canonical spelling: lower case, words joined by '_', common synonyms mapped
    ('Happiness' -> 'happy', 'Happily Surprised' and 'HappilySurprised' -> 'happily_surprised')."""
    spaced = re.sub(r"(?<=[a-z])(?=[A-Z])", "_", name.strip())
    key = re.sub(r"[\s\-_]+", "_", spaced.lower()).strip("_")
    return _SYNONYMS.get(key, key)


def known_expressions(vocabulary: Sequence[str]) -> List[str]:
    """Every name a file may carry: the vocabulary plus CFEE's categories."""
    return list(dict.fromkeys(list(vocabulary) + list(CFEE_EXPRESSIONS)))


def check_vocabulary(vocabulary: Iterable[str]) -> List[str]:
    names = [normalize(v) for v in vocabulary]
    if not names:
        raise RegganError("the expression vocabulary is empty; name at least 'neutral' and one target")
    if len(set(names)) != len(names):
        raise RegganError(f"the expression vocabulary has duplicates: {names}")
    bad = [n for n in names if not re.fullmatch(r"[a-z][a-z0-9_]*", n)]
    if bad:
        raise RegganError(f"expression names must be letters, digits and '_', got {bad}")
    return names


def resolve(names: Iterable[str], vocabulary: Sequence[str], what: str = "expression") -> List[str]:
    """Canonical names of `names`, each of which must be in `vocabulary`."""
    out = []
    for name in names:
        canonical = normalize(name)
        if canonical not in vocabulary:
            raise RegganError(
                f"unknown {what} {name!r}; valid expressions are: {', '.join(vocabulary)}"
            )
        out.append(canonical)
    return out


def from_cfee_code(code: str) -> Optional[str]:
    """CFEE category name of a numeric code '1'..'22' (or '01'), None otherwise."""
    if code.isdigit() and 1 <= int(code) <= len(CFEE_EXPRESSIONS):
        return CFEE_EXPRESSIONS[int(code) - 1]
    return None


def index_map(vocabulary: Sequence[str]) -> Dict[str, int]:
    return {name: i for i, name in enumerate(vocabulary)}
