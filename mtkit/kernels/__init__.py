"""CPU speed kernels that compute what torch's own layers do: float32 matmuls through oneDNN with
prepacked weights for decoding (:mod:`mtkit.kernels.linear`) and a cheaper dropout mask
(:mod:`mtkit.kernels.dropout`). Models and the loss use them; they import nothing from mtkit."""
