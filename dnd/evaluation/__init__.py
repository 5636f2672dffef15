"""Evaluation suites of the paper (ALGORITHM.md, Evaluation protocols) and ``dnd evaluate``.

- :mod:`.labels`: description files (``labels.csv`` of a run, or ``layer,unit,description``)
- :mod:`.embedders`: text embedders by name (MiniLM offline, MPNet, CLIP text)
- :mod:`.final_layer`: output-layer descriptions vs class names
- :mod:`.milan`: MILANNOTATIONS scores, reliable units and the constant baseline
- :mod:`.classifier_search`: AUROC of the unit matched to each unseen class
- :mod:`.cli`: ``dnd evaluate``

``dnd tables``, which regenerates ``results/`` from ``eval/tables.yaml`` with these suites
and the toy-world benchmarks, is :mod:`dnd.benchmarks.tables`.
"""

from dnd.evaluation.classifier_search import (
    ClassifierSearchResult,
    classifier_search,
    match_units,
    run_classifier_search,
)
from dnd.evaluation.embedders import (
    EMBEDDERS,
    CachedEmbedder,
    ClipTextEmbedder,
    SentenceTransformerEmbedder,
    TextEmbedder,
    create_embedder,
    minilm_path,
)
from dnd.evaluation.final_layer import (
    FinalLayerResult,
    SimilarityScore,
    constant_labels,
    final_layer_similarity,
    model_class_names,
)
from dnd.evaluation.labels import LabelFileError, UnitLabels, read_labels
from dnd.evaluation.milan import (
    GENERIC_LABELS,
    MilanResult,
    MilanScore,
    UnitAnnotations,
    milan_scores,
    read_annotations,
    reliable_mask,
)

__all__ = [
    "EMBEDDERS", "GENERIC_LABELS", "CachedEmbedder", "ClassifierSearchResult",
    "ClipTextEmbedder", "FinalLayerResult", "LabelFileError", "MilanResult", "MilanScore",
    "SentenceTransformerEmbedder", "SimilarityScore", "TextEmbedder",
    "UnitAnnotations", "UnitLabels", "classifier_search", "constant_labels",
    "create_embedder", "final_layer_similarity", "match_units", "milan_scores",
    "minilm_path", "model_class_names", "read_annotations", "read_labels", "reliable_mask",
    "run_classifier_search",
]
