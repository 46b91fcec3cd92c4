//! The decoder as an ONNX graph: protobuf messages (`proto`), a builder, exact conversion of GGUF
//! quantized weights to `MatMulNBits` (`quant`), and the decoder layout itself (`decoder`).
pub mod builder;
pub mod corr_op;
pub mod decoder;
pub mod proto;
pub mod quant;

pub use corr_op::{BlockCorrectionOp, CORR_OP_NAME};
pub use decoder::{build_decoder, Activations, DecoderGraph};
