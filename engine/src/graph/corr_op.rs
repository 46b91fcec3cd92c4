//! The `BlockCorrection` custom operator (domain `dev.fasa`): the per-block constant of weights
//! held as 4-bit planes (`quant`), `out = y + BlockSum(x) · corr_t`.
//!
//! Inputs: `x` f32 `(S, K)`, the projection's input; `y` f32 `(S, N)`, the planes' product;
//! `corr_t` f32 `(K / block, N)`, the constants block-major. Attribute `block`. Output `(S, N)`.
//! One node where the graph had four (reshape, reduce, matmul, add): at one token per step the
//! nodes' fixed cost was about that of the arithmetic (issue 3's speed work).
use fasa_kernels::cpu::add_block_correction;
use ort::operator::{ComputeContext, Kernel, KernelContext, Operator, OperatorInput, OperatorOutput};
use ort::value::TensorElementType;

pub const CORR_OP_NAME: &str = "BlockCorrection";

pub struct BlockCorrectionOp;

impl Operator for BlockCorrectionOp {
    type Kernel<'attr> = BlockCorrectionKernel;

    fn name(&self) -> &str {
        CORR_OP_NAME
    }

    fn inputs(&self) -> impl IntoIterator<Item = OperatorInput> {
        (0..3).map(|_| OperatorInput::required(TensorElementType::Float32))
    }

    fn outputs(&self) -> impl IntoIterator<Item = OperatorOutput> {
        [OperatorOutput::required(TensorElementType::Float32)]
    }

    fn create_kernel<'attr>(&self, k: &KernelContext<'attr>) -> ort::Result<BlockCorrectionKernel> {
        let block: i64 = k.get("block").ok_or_else(|| ort::Error::new("BlockCorrection: missing attribute block"))?;
        match usize::try_from(block) {
            Ok(block) if block > 0 => Ok(BlockCorrectionKernel { block }),
            _ => Err(ort::Error::new(format!("BlockCorrection: block = {block}"))),
        }
    }
}

pub struct BlockCorrectionKernel {
    block: usize,
}

/// A raw output pointer shared by `par_for` workers that write disjoint rows.
struct Rows(*mut f32);
// SAFETY: each worker writes only its own rows of one buffer that outlives `par_for`.
unsafe impl Sync for Rows {}
unsafe impl Send for Rows {}

impl Rows {
    fn get(&self) -> *mut f32 {
        self.0
    }
}

impl Kernel for BlockCorrectionKernel {
    fn compute(&mut self, ctx: &ComputeContext) -> ort::Result<()> {
        let input = |i: usize, what: &str| ctx.input(i)?.ok_or_else(|| ort::Error::new(format!("BlockCorrection: missing {what}")));
        let (x_in, y_in, c_in) = (input(0, "x")?, input(1, "y")?, input(2, "corr_t")?);
        let (xs, x) = x_in.try_extract_tensor::<f32>()?;
        let (ys, y) = y_in.try_extract_tensor::<f32>()?;
        let (cs, c) = c_in.try_extract_tensor::<f32>()?;
        let dims = |s: &[i64]| -> Option<(usize, usize)> { (s.len() == 2).then(|| (s[0] as usize, s[1] as usize)) };
        let ((s, k), (sy, n), (nb, nc)) = match (dims(xs), dims(ys), dims(cs)) {
            (Some(a), Some(b), Some(c)) => (a, b, c),
            _ => return Err(ort::Error::new(format!("BlockCorrection: shapes {xs:?}, {ys:?}, {cs:?} are not 2-D"))),
        };
        if s != sy || n != nc || k != nb * self.block {
            return Err(ort::Error::new(format!("BlockCorrection: x {xs:?}, y {ys:?}, corr_t {cs:?} with block {}", self.block)));
        }
        let mut out_v = ctx.output(0, vec![s as i64, n as i64])?.ok_or_else(|| ort::Error::new("BlockCorrection: no output"))?;
        let (_, out) = out_v.try_extract_tensor_mut::<f32>()?;
        out.copy_from_slice(y);
        let block = self.block;
        if s == 1 {
            add_block_correction(x, block, c, out);
            return Ok(());
        }
        let rows = Rows(out.as_mut_ptr());
        ctx.par_for(s, 0, |i| {
            // SAFETY: row `i` of `out` (`n` floats) is written by this task alone.
            let o = unsafe { std::slice::from_raw_parts_mut(rows.get().add(i * n), n) };
            add_block_correction(&x[i * k..(i + 1) * k], block, c, o);
        })
    }
}
