"""What each figure of a run shows, in words a learner reads beside it: the titles and captions of
the report and of the page that compares runs."""

CAPTIONS = {
    "samples": "New images made by the decoder alone from random points z ~ N(0, I); the encoder "
    "plays no part. Look for digit-like shapes: blurry or mixed digits are typical of a small "
    "latent space or a short training run.",
    "reconstructions": "Top row: test images the model never trained on; bottom row: what the "
    "decoder makes of each image's latent mean. Close copies mean the code keeps the digit's "
    "identity; lost details show what the few latent numbers cannot hold.",
    "latent": "Each dot is one test image placed at its latent mean, coloured by its true label "
    "(which the model never saw). Digits of one class forming clusters means the encoder learned "
    "what distinguishes them without being told; the cloud should stay near a standard normal "
    "(mostly within ±3). With more than two latent dimensions the plot shows the first two "
    "principal components of the means.",
    "manifold": "The seed's picture of the latent space: images decoded on an even grid of "
    "Gaussian quantiles. Nearby points decode to similar digits and one digit morphs smoothly "
    "into another; the grid spans the central 90% of the prior along each axis (for more than "
    "two latent dimensions: along the two leading principal directions, other coordinates 0).",
    "traversals": "Each row changes one latent dimension (the most active first) from -3 to +3 around the "
    "code of the test image on the left, the others fixed. Where a row changes one thing only (a "
    "digit's slant, a sprite's position or size), that dimension has captured one factor of the "
    "data: what beta-VAEs aim for. Dimensions that change nothing are inactive.",
    "interpolation": "Decodings of points on the straight line between the latent means of two "
    "test images of different classes. A smooth change with plausible digits on the way shows a "
    "continuous latent space without holes.",
    "curves": "Loss per epoch on the training set (averaged over the epoch) and the test set "
    "(after the epoch). The loss is the sum of reconstruction and KL. Test close to train means no "
    "over-fitting; a flat end means more epochs would gain little.",
    "kl_per_dim": "How many nats each latent dimension carries on average. Grey bars are "
    "inactive dimensions: their posterior means barely vary between images, so the model ignores "
    "them (posterior collapse).",
    "ring": "The seed's argument for a Gaussian prior: a fixed function g(z) = z/10 + z/‖z‖ "
    "turns a standard normal cloud (left) into a ring (right). Colour is each point's distance "
    "from 0, showing where it goes. A decoder learns such a map, from N(0, I) to digits.",
}

TITLES = {
    "samples": "Samples from the prior",
    "reconstructions": "Reconstructions",
    "latent": "The latent space",
    "manifold": "The manifold",
    "traversals": "Latent traversals",
    "interpolation": "Interpolation",
    "curves": "Training curves",
    "kl_per_dim": "KL per latent dimension",
    "ring": "Why a Gaussian prior is enough",
}

# Where a hierarchy, a VampPrior or a flow (vaelab.models.deep) shows something else
DEEP_TITLES = {"kl_per_dim": "Activity per latent dimension, layer by layer"}
DEEP_CAPTIONS = {
    "latent": "Each dot is one test image placed at the posterior mean of the model's top stochastic "
    "layer (the layers below at their means), coloured by its true label. With more than two "
    "dimensions: the first two principal components of those means.",
    "manifold": "Images decoded on an even grid of the top layer's Gaussian quantiles (along its two "
    "leading principal directions when it has more than two dimensions); the layers below are "
    "taken at their prior means given the layer above, so the grid shows what the top layer "
    "alone decides.",
    "kl_per_dim": "For each stochastic layer, bottom to top, how much each dimension's posterior mean "
    "varies between test images (log scale). Dimensions under the dashed line are inactive: the "
    "model ignores them. A hierarchy, a VampPrior or a flow has no closed-form KL per dimension; "
    "vaelab evaluate gives each layer's KL.",
    "samples": "New images drawn ancestrally from the model: the top layer from its prior, each layer "
    "below from its conditional given the one above, then the pixels' probabilities.",
}

# evaluation.json keys (vaelab.evaluate), in the order shown; other keys follow as they come
EVALUATION_LABELS = {
    "elbo": "ELBO (nats/image)",
    "elbo_stderr": "ELBO standard error",
    "nll": "negative log-likelihood bound, -IWAE_k (nats/image)",
    "nll_stderr": "its standard error",
    "log_px": "log-likelihood bound, IWAE_k (nats/image)",
    "bits_per_dim": "bits per dimension (from the IWAE bound)",
    "elbo_bits_per_dim": "bits per dimension (from the ELBO)",
    "loss": "negative ELBO (nats/image)",
    "recon": "reconstruction term (nats/image)",
    "kl": "KL term (nats/image)",
    "k": "importance samples per image (k)",
    "n_images": "test images",
    "binarization": "test images binarized as",
    "active_dims": "active latent dimensions",
    "active_threshold": "activity threshold (variance of the posterior mean)",
    "kl_per_dim": "KL per latent dimension (nats/image)",
    "latent_sizes": "stochastic layers, bottom to top (dimensions)",
    "active_dims_per_layer": "active latent dimensions per layer",
    "kl_per_layer": "KL per layer, bottom to top (nats/image, a Monte Carlo mean)",
    "kl_estimate": "how the KL was computed",
    "disentanglement": "disentanglement (MIG and the FactorVAE score, with their choices)",
    "posterior_mean_variance": "variance of each dimension's posterior mean",
    "seconds": "seconds",
}
