"""The official PFANet (K, its model.py) rebuilt in tf.keras: the reference of PFANet-K's parity tests.

Layer names are the official model.py's, so a whole-model .h5 this build writes reads like the
published weights. TensorFlow is optional: the caller imports it and passes `tf` and `keras` in.
"""


def build(tf, keras, size: int):
    """The official PFANet (K model.py, CPFE + CA + SA, no dropout) with its layer names, in Keras 3."""
    layers = keras.layers

    class BatchNorm(layers.BatchNormalization):
        """As in K: batch statistics even at inference."""

        def call(self, inputs, training=None, mask=None):
            return super().call(inputs, training=True, mask=mask)

    class BilinearUpsampling(layers.Layer):
        """tf resize_bilinear with align_corners=True, as K's BilinearUpsampling layer."""

        def __init__(self, factor, **kwargs):
            super().__init__(**kwargs)
            self.factor = factor

        def call(self, x):
            size = (x.shape[1] * self.factor, x.shape[2] * self.factor)
            return tf.compat.v1.image.resize_bilinear(x, size, align_corners=True)

        def compute_output_shape(self, s):
            return (s[0], s[1] * self.factor, s[2] * self.factor, s[3])

    def bn_relu(x, name):
        return layers.Activation("relu", name=name + "_relu")(BatchNorm(name=name + "_BN")(x))

    def cfe(x, name):
        branches = [layers.Conv2D(32, 1, padding="same", use_bias=False, name=name + "_cfe0")(x)]
        branches += [
            layers.Conv2D(32, 3, padding="same", dilation_rate=r, use_bias=False, name=f"{name}_cfe{i}_dilation")(x)
            for i, r in enumerate((3, 5, 7), start=1)
        ]
        return bn_relu(layers.Concatenate(name=name + "concatcfe")(branches), name)

    inputs = keras.Input((size, size, 3))
    x, feats = inputs, []
    for block, n_convs, width in ((1, 2, 64), (2, 2, 128), (3, 3, 256), (4, 3, 512), (5, 3, 512)):
        if block > 1:
            x = layers.MaxPooling2D(2, name=f"block{block - 1}_pool")(x)
        for i in range(1, n_convs + 1):
            x = layers.Conv2D(width, 3, activation="relu", padding="same", name=f"block{block}_conv{i}")(x)
        feats.append(x)
    c1, c2, c3, c4, c5 = feats
    c1 = bn_relu(layers.Conv2D(64, 3, padding="same", name="C1_conv")(c1), "C1_BN")
    c2 = bn_relu(layers.Conv2D(64, 3, padding="same", name="C2_conv")(c2), "C2_BN")
    c5 = BilinearUpsampling(4, name="C5_cfe_up4")(cfe(c5, "C5_cfe"))
    c4 = BilinearUpsampling(2, name="C4_cfe_up2")(cfe(c4, "C4_cfe"))
    c345 = layers.Concatenate(name="C345_aspp_concat")([cfe(c3, "C3_cfe"), c4, c5])
    gates = layers.GlobalAveragePooling2D(name="C345_ChannelWiseAttention_withcpfe_GlobalAveragePooling2D")(c345)
    gates = layers.Dense(384, activation="sigmoid")(layers.Dense(96, activation="relu")(gates))
    c345 = c345 * layers.Reshape((1, 1, 384), name="C345_ChannelWiseAttention_withcpfe_reshape")(gates)
    c345 = bn_relu(layers.Conv2D(64, 1, padding="same", name="C345_conv")(c345), "C345")
    c345 = BilinearUpsampling(4, name="C345_up4")(c345)

    def sa_branch(g, kernels):
        y = c345
        for i, (kernel, width) in enumerate(zip(kernels, (32, 1)), start=1):
            y = layers.Conv2D(width, kernel, padding="same", name=f"spatial_attention_{g}_conv{i}")(y)
            y = bn_relu(y, f"attention{g}_{i}")
        return y

    sa = layers.Add(name="spatial_attention_add")([sa_branch(1, ((1, 9), (9, 1))), sa_branch(2, ((9, 1), (1, 9)))])
    sa = layers.Activation("sigmoid")(sa)
    c2 = BilinearUpsampling(2, name="C2_up2")(c2)
    c12 = layers.Concatenate(name="C12_concat")([c1, c2])
    c12 = bn_relu(layers.Conv2D(64, 3, padding="same", name="C12_conv")(c12), "C12")
    c12 = c12 * sa
    fea = layers.Concatenate(name="fuse_concat")([c12, c345])
    return keras.Model(inputs, layers.Conv2D(1, 3, padding="same", name="sa")(fea))
