"""tf_instdisc: unsupervised feature learning by non-parametric instance discrimination (Wu et al., CVPR 2018).

Modules (one concept each): config, data, augment, backbones, model, memory_bank, objectives, distribute,
schedules, checkpointing, knn, train_lib. Import them directly, e.g. `from tf_instdisc import train_lib`; this
package file imports nothing, so `import tf_instdisc` stays cheap and free of side effects.
"""

__version__ = "0.1.0"
