//! The frozen backbone through tract (spec §2): the tap outputs are selected by name *before*
//! optimisation, so everything after the last tap (the ONNX file's own head) is pruned; the model
//! is optimised once at load and one execution state is reused for every frame.

use crate::error::{Error, Result};
use crate::model::{Layout, LoadedDescription};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tract_onnx::prelude::*;

/// A loaded backbone producing `levels × (positions × channels)` features per frame.
pub struct Backbone {
    state: Box<dyn State>,
    levels: usize,
    on_gpu: bool,
    input_hw: (usize, usize),
    layout: Layout,
    prefix: usize,
    positions: usize,
    channels: usize,
    onnx_path: PathBuf,
    onnx_sha256: [u8; 32],
}

impl std::fmt::Debug for Backbone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backbone")
            .field("onnx", &self.onnx_path)
            .field("levels", &self.levels())
            .field("on_gpu", &self.on_gpu)
            .finish()
    }
}

/// Levenshtein distance, for "did you mean" lists of node names.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, &cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != cb))
                .min(prev[j + 1] + 1)
                .min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// The `n` names of `candidates` closest to `wanted`.
pub fn nearest_names<'a>(
    wanted: &str,
    candidates: impl Iterator<Item = &'a str>,
    n: usize,
) -> Vec<String> {
    let mut scored: Vec<(usize, &str)> =
        candidates.map(|c| (edit_distance(wanted, c), c)).collect();
    scored.sort();
    scored.dedup_by(|a, b| a.1 == b.1);
    scored
        .into_iter()
        .take(n)
        .map(|(_, c)| c.to_string())
        .collect()
}

impl Backbone {
    /// Load, tap and optimise the ONNX file of `model` (or `onnx_override`) for tract's CPU path.
    pub fn load(model: &LoadedDescription, onnx_override: Option<&Path>) -> Result<Self> {
        Self::load_on(model, onnx_override, false)
    }

    /// As [`Backbone::load`]; with `gpu`, through tract-cuda when it can run here (built with the
    /// `gpu-backbone` feature, CUDA driver, cuDNN and cuBLAS present), else an error saying why.
    pub fn load_on(
        model: &LoadedDescription,
        onnx_override: Option<&Path>,
        gpu: bool,
    ) -> Result<Self> {
        let path = model.onnx_path(onnx_override);
        let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
        let onnx_sha256: [u8; 32] = {
            use sha2::Digest;
            sha2::Sha256::digest(&bytes).into()
        };
        let onnx_err = |e: anyhow::Error| Error::Onnx {
            path: path.clone(),
            message: format!("{e:#}"),
        };
        let mut graph = tract_onnx::onnx()
            .model_for_read(&mut &bytes[..])
            .map_err(onnx_err)?;
        drop(bytes);
        let d = &model.desc;
        let (h, w) = (d.input.size[0], d.input.size[1]);
        let input_ix = match &d.input.name {
            None => 0,
            Some(name) => graph
                .input_outlets()
                .map_err(onnx_err)?
                .iter()
                .position(|o| graph.node(o.node).name == *name)
                .ok_or_else(|| Error::ModelDescription {
                    path: model.path.clone(),
                    message: format!("input.name: `{name}` is not an input of {}", path.display()),
                })?,
        };
        graph
            .set_input_fact(input_ix, f32::fact([1, 3, h, w]).into())
            .map_err(onnx_err)?;

        // Tap outputs by name; a miss lists the closest node-output names.
        let mut outlets = Vec::with_capacity(d.taps.len());
        for tap in &d.taps {
            let found = graph.find_outlet_label(&tap.output).or_else(|| {
                graph
                    .nodes()
                    .iter()
                    .find(|n| n.name == tap.output)
                    .map(|n| OutletId::new(n.id, 0))
            });
            match found {
                Some(o) => outlets.push(o),
                None => {
                    let labels: Vec<String> = graph
                        .nodes()
                        .iter()
                        .flat_map(|n| (0..n.outputs.len()).map(move |i| OutletId::new(n.id, i)))
                        .filter_map(|o| graph.outlet_label(o).map(str::to_string))
                        .chain(graph.nodes().iter().map(|n| n.name.clone()))
                        .collect();
                    return Err(Error::UnknownTap {
                        path,
                        tap: tap.output.clone(),
                        nearest: nearest_names(&tap.output, labels.iter().map(String::as_str), 5),
                    });
                }
            }
        }
        graph.select_output_outlets(&outlets).map_err(onnx_err)?;
        let typed = graph
            .into_typed()
            .and_then(|m| m.into_decluttered())
            .map_err(onnx_err)?;

        // Check the tap shapes against the description once, here, not per frame.
        let f = &d.features;
        let positions = f.grid[0] * f.grid[1];
        let expect: Vec<usize> = match f.layout {
            Layout::Tokens => vec![1, f.prefix_tokens + positions, f.channels],
            Layout::Maps => vec![1, f.channels, f.grid[0], f.grid[1]],
        };
        for (k, tap) in d.taps.iter().enumerate() {
            let fact = typed.output_fact(k).map_err(onnx_err)?;
            let shape: Option<Vec<usize>> = fact.shape.as_concrete().map(|s| s.to_vec());
            if shape.as_deref() != Some(&expect[..]) {
                return Err(Error::ModelDescription {
                    path: model.path.clone(),
                    message: format!(
                        "taps[{k}] `{}` has shape {:?} in {}, but features (layout, prefix_tokens, grid, channels) say {expect:?}",
                        tap.output,
                        fact.shape,
                        path.display()
                    ),
                });
            }
        }
        let levels = typed.outputs.len();
        let state: Box<dyn State> = if gpu {
            gpu_state(typed)
                .map_err(|message| Error::Gpu(format!("backbone on the GPU: {message}")))?
        } else {
            let plan = typed
                .into_optimized()
                .and_then(|m| m.into_runnable())
                .map_err(onnx_err)?;
            Box::new(plan.spawn().map_err(onnx_err)?)
        };
        Ok(Self {
            state,
            levels,
            on_gpu: gpu,
            input_hw: (h, w),
            layout: f.layout,
            prefix: f.prefix_tokens,
            positions,
            channels: f.channels,
            onnx_path: path,
            onnx_sha256,
        })
    }

    /// Number of tapped levels.
    pub fn levels(&self) -> usize {
        self.levels
    }
    /// True when the backbone runs through tract-cuda.
    pub fn on_gpu(&self) -> bool {
        self.on_gpu
    }
    /// SHA-256 of the ONNX bytes (the backbone's identity in a bank).
    pub fn onnx_sha256(&self) -> [u8; 32] {
        self.onnx_sha256
    }
    /// The ONNX file.
    pub fn onnx_path(&self) -> &Path {
        &self.onnx_path
    }

    /// Run one normalised `3 × H × W` input; `out[l]` receives level `l` as `positions × channels`.
    pub fn run(&mut self, chw: &[f32], out: &mut [Vec<f32>]) -> Result<()> {
        let (h, w) = self.input_hw;
        let input = Tensor::from_shape(&[1, 3, h, w], chw)
            .map_err(|e| Error::Inference(format!("{e:#}")))?;
        let outputs = self
            .state
            .run(tvec![input.into()])
            .map_err(|e| Error::Inference(format!("{e:#}")))?;
        let (p, c) = (self.positions, self.channels);
        for (level, (t, dst)) in outputs.iter().zip(out.iter_mut()).enumerate() {
            let err = |e: anyhow::Error| Error::Inference(format!("level {}: {e:#}", level + 1));
            let view = t.try_as_plain_ram().map_err(err)?;
            let v = view.as_slice::<f32>().map_err(err)?;
            dst.resize(p * c, 0.0);
            match self.layout {
                Layout::Tokens => dst.copy_from_slice(&v[self.prefix * c..(self.prefix + p) * c]),
                Layout::Maps => {
                    for ch in 0..c {
                        for pos in 0..p {
                            dst[pos * c + ch] = v[ch * p + pos];
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

/// The tapped, decluttered model prepared by tract-cuda's runtime (spec §2 on the GPU). Its
/// outputs come back to the host: tract-gpu's translator ends every model output with a
/// to-host sync, and its runner hands out host tensors only, so the taps reach edge-ad's kernels
/// through one copy back and the frame's upload (1.6 MB per DINOv2-S frame).
#[cfg(feature = "gpu-backbone")]
fn gpu_state(typed: TypedModel) -> std::result::Result<Box<dyn State>, String> {
    // Naming the crate links its runtime registration.
    let _ = std::any::type_name::<tract_cuda::CudaTransform>();
    let rt = tract_onnx::tract_core::runtime::runtime_for_name("cuda")
        .map_err(|e| format!("{e:#}"))?
        .ok_or("tract-cuda's runtime is not registered")?;
    rt.check().map_err(|e| format!("{e:#}"))?;
    // tract-cuda creates its context on first use and panics if that fails: keep it an error.
    let prepared = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        rt.prepare(typed).and_then(|r| r.spawn())
    }))
    .map_err(|_| "tract-cuda panicked while preparing the model".to_string())?;
    prepared.map_err(|e| format!("{e:#}"))
}

#[cfg(not(feature = "gpu-backbone"))]
fn gpu_state(_typed: TypedModel) -> std::result::Result<Box<dyn State>, String> {
    Err("this edge-ad was built without the `gpu-backbone` feature (tract-cuda)".into())
}

/// Tract's executor on `pool`, so the backbone and the kernels share one set of threads.
pub fn tract_executor(pool: Arc<rayon::ThreadPool>) -> tract_linalg::multithread::Executor {
    tract_linalg::multithread::Executor::MultiThread(pool)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_names_ranks_by_edit_distance() {
        let names = [
            "/a/layer.2/Add_1_output_0",
            "/a/layer.2/Add_output_0",
            "/b/Conv",
        ];
        let n = nearest_names("/a/layer.2/Add_2_output_0", names.iter().copied(), 2);
        assert_eq!(n, ["/a/layer.2/Add_1_output_0", "/a/layer.2/Add_output_0"]);
    }
}
