from waldo.eval.metrics import (average_precision, match_matrix, mean_average_precision,
                                recall_at_k, recall_curve, retrieval_metrics)

__all__ = ["average_precision", "match_matrix", "mean_average_precision", "recall_at_k", "recall_curve",
           "retrieval_metrics"]
