//! Rotary position embedding over the model's true rotation pairs.

/// Per-FC inverse frequencies of one head: FC `f` rotates at `theta^(-2f/d)` radians per position.
#[derive(Debug, Clone)]
pub struct Rope {
    /// `(n_fc,)` radians per position.
    inv_freq: Vec<f64>,
}

impl Rope {
    pub fn new(theta: f32, head_dim: usize) -> Self {
        let d = head_dim as f64;
        let inv_freq = (0..head_dim / 2).map(|f| (theta as f64).powf(-2.0 * f as f64 / d)).collect();
        Self { inv_freq }
    }

    pub fn n_fc(&self) -> usize {
        self.inv_freq.len()
    }

    /// `(n_fc, 2)` cos/sin of every FC at position `pos` (angles in f64: positions reach 1e5).
    pub fn cos_sin(&self, pos: usize, out: &mut [f32]) {
        for (f, w) in self.inv_freq.iter().enumerate() {
            let a = pos as f64 * w;
            out[2 * f] = a.cos() as f32;
            out[2 * f + 1] = a.sin() as f32;
        }
    }

    /// Rotates one head `x` (`(d,)`, model dim order) in place; `pair(f)` gives FC `f`'s two dims.
    pub fn rotate(&self, x: &mut [f32], cos_sin: &[f32], pair: impl Fn(usize) -> (usize, usize)) {
        for f in 0..self.n_fc() {
            let (i, j) = pair(f);
            let (c, s) = (cos_sin[2 * f], cos_sin[2 * f + 1]);
            let (a, b) = (x[i], x[j]);
            x[i] = a * c - b * s;
            x[j] = a * s + b * c;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_keeps_norm_and_is_relative() {
        // q·k after rotating q at m and k at n depends only on m - n.
        let r = Rope::new(10000.0, 8);
        let pair = |f: usize| (2 * f, 2 * f + 1);
        let (q0, k0) = ([0.3f32, -1.0, 2.0, 0.5, 1.5, -0.2, 0.7, 0.1], [1.0f32, 0.4, -0.3, 0.9, 0.2, 1.1, -0.6, 0.8]);
        let dot_at = |m: usize, n: usize| {
            let (mut q, mut k) = (q0, k0);
            let mut cs = [0.0; 8];
            r.cos_sin(m, &mut cs);
            r.rotate(&mut q, &cs, pair);
            r.cos_sin(n, &mut cs);
            r.rotate(&mut k, &cs, pair);
            q.iter().zip(&k).map(|(a, b)| a * b).sum::<f32>()
        };
        assert!((dot_at(7, 3) - dot_at(104, 100)).abs() < 1e-4);
        let mut q = q0;
        let mut cs = [0.0; 8];
        r.cos_sin(5, &mut cs);
        r.rotate(&mut q, &cs, |f| (f, f + 4));
        let n0: f32 = q0.iter().map(|a| a * a).sum();
        let n1: f32 = q.iter().map(|a| a * a).sum();
        assert!((n0 - n1).abs() < 1e-5);
    }
}
