// Merged into the JupyterLab builder's config. Module and chunk ids by (relative) name: the
// default ids are hashes that differ with the folder the build runs in, and the committed
// prebuilt assets must be byte-identical to a rebuild anywhere (tests/test_labextension.py).
module.exports = {
  optimization: { moduleIds: 'named', chunkIds: 'named' }
};
