//! Products (docs/line.md, "Products"): one pipeline, one bank per `[[product]]`, all loaded and
//! checked at start, so that a change-over is an index and never costs a frame. [`Judge`] is
//! what every inspection stage (folder, file, camera) calls with the frame of a part and the
//! product in effect at its trigger.

use crate::arbiter::StageResult;
use crate::archive::{ArchiveTap, Capture};
use crate::config::ProductSection;
use crate::error::{LineError, Result};
use crate::status::{crc32, ErrCause, ProductInfo};
use edge_ad::heatmap::Scale;
use edge_ad::inspector::Inspector;
use edge_ad::pipeline::PipelineOptions;
use edge_ad::preprocess::Rgb8;
use std::path::Path;

/// One product's verdict rule.
struct Rule {
    /// Scores above are NG: the product's override or its bank's threshold.
    threshold: f64,
    scale: Scale,
}

/// The inspector with every product's bank, their thresholds, and the archive's tap.
pub struct Judge {
    inspector: Inspector,
    rules: Vec<Rule>,
    /// Product id per bank.
    ids: Vec<u16>,
    archive: Option<ArchiveTap>,
}

impl Judge {
    /// Load the model once and every product's bank over it. A bank made with another model,
    /// fit or projector is refused naming the product (`named`: the products are `[[product]]`
    /// entries, not `model.bank`); the memory each bank takes is logged.
    pub fn load(
        opts: &PipelineOptions,
        products: &[ProductSection],
        named: bool,
    ) -> Result<(Self, Vec<ProductInfo>)> {
        let mut infos = Vec::with_capacity(products.len());
        let mut rules = Vec::with_capacity(products.len());
        let mut inspector: Option<Inspector> = None;
        for (i, p) in products.iter().enumerate() {
            let wrap = |source: edge_ad::Error| {
                if named {
                    LineError::Product {
                        index: i,
                        id: p.id,
                        name: p.name.clone(),
                        source: Box::new(source),
                    }
                } else {
                    LineError::Runtime(source)
                }
            };
            let bytes = std::fs::read(&p.bank).map_err(|source| LineError::Open {
                field: if named { "product.bank" } else { "model.bank" },
                path: p.bank.clone(),
                source,
            })?;
            if edge_ad_calibration::bankset::is_bank_set(&bytes) {
                if named {
                    return Err(wrap(edge_ad::Error::Invalid(format!(
                        "{}: a bank set (several products); give it as model.bank, or one bank per [[product]]",
                        p.bank.display()
                    ))));
                }
                return Self::load_set(opts, p, &bytes);
            }
            let index = match inspector.as_mut() {
                None => {
                    inspector = Some(Inspector::load(opts, &p.bank).map_err(wrap)?);
                    0
                }
                Some(insp) => insp.add_bank(&p.bank).map_err(wrap)?,
            };
            let insp = inspector.as_ref().expect("loaded above");
            let header = insp.header_of(index).expect("bank just loaded");
            let threshold = p.threshold.unwrap_or(header.threshold.value);
            log::info!(
                "product {} ({}): bank {} ({:.1} MB of reference features, CRC-32 {:08x}), threshold {:.4}{}",
                p.id,
                p.name,
                p.bank.display(),
                insp.bank_bytes(index) as f64 / 1e6,
                crc32(&bytes),
                threshold,
                if p.threshold.is_some() {
                    " (products's own, not the bank's)"
                } else {
                    ""
                }
            );
            rules.push(Rule {
                threshold,
                scale: Scale::for_threshold(header.threshold.normal_min, threshold),
            });
            infos.push(ProductInfo {
                id: p.id,
                name: p.name.clone(),
                bank_crc: crc32(&bytes),
            });
        }
        let inspector = inspector.ok_or_else(|| LineError::Config {
            path: "line.toml".into(),
            message: "no product to inspect".into(),
        })?;
        let total: usize = (0..inspector.bank_count())
            .map(|i| inspector.bank_bytes(i))
            .sum();
        log::info!(
            "{} product(s) loaded, {:.1} MB of reference features together",
            infos.len(),
            total as f64 / 1e6
        );
        Ok((
            Self {
                inspector,
                rules,
                ids: infos.iter().map(|p| p.id).collect(),
                archive: None,
            },
            infos,
        ))
    }

    /// `model.bank` is a bank set (`calibrate --product`): its products are numbered 1, 2, … in
    /// the set's order and named as in it; BANK_CRC32 is the set file's for each.
    fn load_set(
        opts: &PipelineOptions,
        p: &ProductSection,
        bytes: &[u8],
    ) -> Result<(Self, Vec<ProductInfo>)> {
        let set = edge_ad_calibration::BankSet::from_bytes(bytes, &p.bank)
            .map_err(|e| LineError::Runtime(e.into()))?;
        let inspector = Inspector::load_set(opts, set, &p.bank)?;
        let names = inspector.product_names().unwrap_or(&[]).to_vec();
        let crc = crc32(bytes);
        let mut rules = Vec::new();
        let mut infos = Vec::new();
        for (i, name) in names.iter().enumerate() {
            let header = inspector.header_of(i).expect("set bank loaded");
            let threshold = header.threshold.value;
            log::info!(
                "product {} ({name}) of the bank set {}: {:.1} MB of reference features, threshold {threshold:.4}",
                i + 1,
                p.bank.display(),
                inspector.bank_bytes(i) as f64 / 1e6,
            );
            rules.push(Rule {
                threshold,
                scale: Scale::for_threshold(header.threshold.normal_min, threshold),
            });
            infos.push(ProductInfo {
                id: (i + 1) as u16,
                name: name.clone(),
                bank_crc: crc,
            });
        }
        Ok((
            Self {
                inspector,
                rules,
                ids: infos.iter().map(|p| p.id).collect(),
                archive: None,
            },
            infos,
        ))
    }

    /// Hand frames of parts the archive may keep to it.
    pub fn set_archive(&mut self, tap: Option<ArchiveTap>) {
        self.archive = tap;
    }

    /// `select = "auto"`: prepare recognising the products from frames (each bank's signature,
    /// logged); a bank that cannot be recognised is refused naming its product.
    pub fn enable_recognition(&mut self, products: &[ProductInfo]) -> Result<()> {
        self.inspector.enable_recognition().map_err(|(i, e)| {
            let p = &products[i.min(products.len() - 1)];
            LineError::Product {
                index: i,
                id: p.id,
                name: p.name.clone(),
                source: Box::new(edge_ad::Error::Invalid(e.to_string())),
            }
        })?;
        for (p, s) in products
            .iter()
            .zip(self.inspector.signatures().unwrap_or(&[]))
        {
            log::info!(
                "product {} ({}): recognised from {} reference descriptors on level {}, radius {:.4}, gap to the next product {:.4}: accepted within {:.4}",
                p.id,
                p.name,
                s.descriptors.len(),
                s.level,
                s.radius,
                s.gap,
                s.limit()
            );
        }
        Ok(())
    }

    /// Inspect the frame of `tag` as product `product` (index), or as the product recognised
    /// in it (`None`): its score, whether it is NG by that product's threshold, and the product.
    pub fn judge(
        &mut self,
        tag: u32,
        product: Option<usize>,
        img: &Rgb8,
        path: &Path,
    ) -> StageResult {
        let inference = |e: edge_ad::Error| {
            log::warn!("tag {tag}: inference: {e}");
            ErrCause::Inference
        };
        let (product, insp) = match product {
            Some(p) => (
                p,
                self.inspector
                    .inspect_with(p, img, path)
                    .map_err(inference)?
                    .0,
            ),
            None => match self.inspector.inspect_auto(img, path).map_err(inference)? {
                (rec, Some((insp, _))) => (rec.bank.unwrap_or(0), insp),
                (rec, None) => {
                    log::warn!(
                        "tag {tag}: the frame matches no product (distances {:?})",
                        rec.distances
                    );
                    return Err(ErrCause::Unrecognised);
                }
            },
        };
        let Some(rule) = self.rules.get(product) else {
            log::warn!("tag {tag}: product index {product} is not loaded");
            return Err(ErrCause::Inference);
        };
        let score = insp.score;
        let ng = !score.is_finite() || score as f64 > rule.threshold;
        // Tag 0 is the self-test's frame: never a part, never archived.
        if let (Some(tap), true) = (&self.archive, tag != 0) {
            if tap.wants(ng) {
                tap.offer(Capture {
                    tag,
                    frame: img.clone(),
                    inspection: insp,
                    threshold: rule.threshold,
                    scale: rule.scale,
                    product: self.ids.get(product).copied().unwrap_or(0),
                });
            }
        }
        Ok((score, ng, product))
    }
}
