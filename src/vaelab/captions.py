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
    "interpolation": "Interpolation",
    "curves": "Training curves",
    "kl_per_dim": "KL per latent dimension",
    "ring": "Why a Gaussian prior is enough",
}
