"""Test-set evaluation, without MLflow: estimators (metrics), the measures that apply them to a model
(measures), evaluate_model that picks those that fit the variant (evaluate), and the reference classifier."""

from aetrack.evaluation.evaluate import (DEFAULT_NOISE_LEVELS, Evaluation, Settings, default_iw_samples,  # noqa: F401
                                         evaluate_model, format_table)
from aetrack.evaluation.measures import (bound_terms, denoising_table, generate_images, jacobian_norm,  # noqa: F401
                                         kl_per_dimension, nll_iw, reconstruction_measures, traversal)
from aetrack.evaluation.metrics import (active_units, code_statistics, feature_statistics, frechet_distance,  # noqa: F401
                                        frechet_distance_from_statistics, iwae_nll, kernel_inception_distance,
                                        knn_accuracy, label_accuracy, mse_per_image, probe_accuracy, psnr)
