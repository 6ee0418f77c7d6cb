//! `/metrics` (Prometheus text): generation requests, latency, time to first token and tokens
//! per served version, so an A/B or canary split can be read off side by side; shadow
//! comparisons per (model, primary version, shadow version): outcomes, both sides' latency
//! on the mirrored requests, where greedy answers first differ; downloads by route; the model
//! cache (loaded versions, bytes, loads, evictions) and each engine's batching (decode steps
//! and the sequences they advanced: the mean batch size).

use crate::serving::cache::ModelCache;
use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::Ordering;

/// Upper bounds (seconds) of the latency histograms.
const BUCKETS: [f64; 12] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

/// Upper bounds (token positions) of the histogram of where greedy shadow answers first differ.
const POSITIONS: [f64; 12] = [0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 1024.0, 4096.0];

#[derive(Clone)]
struct Histogram {
    bounds: &'static [f64],
    buckets: Vec<u64>,
    count: u64,
    sum: f64,
}

/// A latency histogram (seconds).
impl Default for Histogram {
    fn default() -> Self {
        Histogram::with_bounds(&BUCKETS)
    }
}

impl Histogram {
    fn with_bounds(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            buckets: vec![0; bounds.len()],
            count: 0,
            sum: 0.0,
        }
    }

    fn observe(&mut self, value: f64) {
        self.count += 1;
        self.sum += value;
        for (b, &bound) in self.buckets.iter_mut().zip(self.bounds) {
            if value <= bound {
                *b += 1;
            }
        }
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        for (b, bound) in self.buckets.iter().zip(self.bounds) {
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{bound}\"}} {b}");
        }
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(
            out,
            "{name}_sum{{{labels}}} {}\n{name}_count{{{labels}}} {}",
            self.sum, self.count
        );
    }
}

#[derive(Clone, Default)]
struct VersionStats {
    /// Requests by outcome (`ok`, `error`, `cancelled`).
    requests: BTreeMap<&'static str, u64>,
    tokens: u64,
    prompt_tokens: u64,
    latency: Histogram,
    first_token: Histogram,
}

/// Mirrored requests of one (model, primary version, shadow version).
#[derive(Clone)]
struct ShadowStats {
    /// By outcome (`agree`, `differ`, `error`, `dropped`, `no_primary`).
    outcomes: BTreeMap<&'static str, u64>,
    shadow_latency: Histogram,
    primary_latency: Histogram,
    first_difference: Histogram,
}

impl Default for ShadowStats {
    fn default() -> Self {
        ShadowStats {
            outcomes: BTreeMap::new(),
            shadow_latency: Histogram::default(),
            primary_latency: Histogram::default(),
            first_difference: Histogram::with_bounds(&POSITIONS),
        }
    }
}

/// What the service counts.
#[derive(Default)]
pub struct ServiceMetrics {
    versions: Mutex<BTreeMap<(String, u32), VersionStats>>,
    /// By (model, primary version, shadow version).
    shadows: Mutex<BTreeMap<(String, u32, u32), ShadowStats>>,
    /// Requests per route family (`files`, `tensors`) and status.
    downloads: Mutex<BTreeMap<(&'static str, u16), u64>>,
}

/// One finished generation request, as counted.
pub struct GenerationOutcome<'a> {
    pub model: &'a str,
    pub version: u32,
    pub outcome: &'static str,
    pub prompt_tokens: u64,
    pub tokens: u64,
    pub seconds: f64,
    pub first_token_seconds: Option<f64>,
}

/// One mirrored request, as counted (see [`super::shadow`]).
pub struct ShadowOutcome<'a> {
    pub model: &'a str,
    /// The primary's version.
    pub version: u32,
    pub shadow_version: u32,
    /// `agree`, `differ`, `error`, `dropped` or `no_primary`.
    pub outcome: &'static str,
    /// The shadow's generation, when it ran.
    pub shadow_seconds: Option<f64>,
    /// The primary's generation, when it finished and was compared.
    pub primary_seconds: Option<f64>,
    /// For greedy requests that differ: the first token position where they part.
    pub first_difference: Option<usize>,
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

impl ServiceMetrics {
    pub fn generation(&self, o: GenerationOutcome<'_>) {
        let mut v = self.versions.lock().expect("metrics lock");
        let s = v.entry((o.model.to_string(), o.version)).or_default();
        *s.requests.entry(o.outcome).or_default() += 1;
        s.tokens += o.tokens;
        s.prompt_tokens += o.prompt_tokens;
        s.latency.observe(o.seconds);
        if let Some(t) = o.first_token_seconds {
            s.first_token.observe(t);
        }
    }

    pub fn shadow(&self, o: ShadowOutcome<'_>) {
        let mut all = self.shadows.lock().expect("metrics lock");
        let s = all
            .entry((o.model.to_string(), o.version, o.shadow_version))
            .or_default();
        *s.outcomes.entry(o.outcome).or_default() += 1;
        if let Some(t) = o.shadow_seconds {
            s.shadow_latency.observe(t);
        }
        if let Some(t) = o.primary_seconds {
            s.primary_latency.observe(t);
        }
        if let Some(at) = o.first_difference {
            s.first_difference.observe(at as f64);
        }
    }

    /// Count a files or tensors answer by its status, and hand it on.
    pub fn download(
        &self,
        route: &'static str,
        answer: Result<axum::response::Response, super::ApiError>,
    ) -> Result<axum::response::Response, super::ApiError> {
        let status = answer.as_ref().map_or_else(|e| e.status, |r| r.status()).as_u16();
        *self
            .downloads
            .lock()
            .expect("metrics lock")
            .entry((route, status))
            .or_default() += 1;
        answer
    }

    pub fn render(&self, cache: Option<&ModelCache>) -> String {
        let mut out = String::new();
        let versions = self.versions.lock().expect("metrics lock").clone();
        render_generation(&mut out, &versions);
        let shadows = self.shadows.lock().expect("metrics lock").clone();
        render_shadows(&mut out, &shadows);
        let name = "gantry_registry_download_requests_total";
        header(
            &mut out,
            name,
            "counter",
            "Checkpoint file and tensor-share requests, by route and status.",
        );
        for ((route, status), n) in self.downloads.lock().expect("metrics lock").iter() {
            let _ = writeln!(out, "{name}{{route=\"{route}\",status=\"{status}\"}} {n}");
        }
        if let Some(cache) = cache {
            render_cache(&mut out, cache);
        }
        out
    }
}

/// The `# HELP` and `# TYPE` lines that open every metric family.
fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// The labels naming one served version.
fn label(model: &str, version: u32) -> String {
    format!("model=\"{}\",version=\"{version}\"", escape(model))
}

/// Requests, tokens and latency histograms, one series per served version.
fn render_generation(out: &mut String, versions: &BTreeMap<(String, u32), VersionStats>) {
    let name = "gantry_registry_generate_requests_total";
    header(
        out,
        name,
        "counter",
        "Generation requests per served version, by outcome.",
    );
    for ((model, version), s) in versions {
        for (outcome, n) in &s.requests {
            let _ = writeln!(out, "{name}{{{},outcome=\"{outcome}\"}} {n}", label(model, *version));
        }
    }
    type PerVersion = fn(&VersionStats) -> u64;
    let counters: [(&str, &str, PerVersion); 2] = [
        (
            "gantry_registry_generate_tokens_total",
            "Tokens generated per served version.",
            |s| s.tokens,
        ),
        (
            "gantry_registry_generate_prompt_tokens_total",
            "Prompt tokens prefilled per served version.",
            |s| s.prompt_tokens,
        ),
    ];
    for (name, help, get) in counters {
        header(out, name, "counter", help);
        for ((model, version), s) in versions {
            let _ = writeln!(out, "{name}{{{}}} {}", label(model, *version), get(s));
        }
    }
    type PerVersionHistogram = fn(&VersionStats) -> &Histogram;
    let histograms: [(&str, &str, PerVersionHistogram); 2] = [
        (
            "gantry_registry_generate_seconds",
            "Generation request latency per served version.",
            |s| &s.latency,
        ),
        (
            "gantry_registry_generate_first_token_seconds",
            "Time to the first generated token per served version.",
            |s| &s.first_token,
        ),
    ];
    for (name, help, get) in histograms {
        header(out, name, "histogram", help);
        for ((model, version), s) in versions {
            get(s).render(out, name, &label(model, *version));
        }
    }
}

/// Shadow comparisons, one series per (model, primary version, shadow version).
fn render_shadows(out: &mut String, shadows: &BTreeMap<(String, u32, u32), ShadowStats>) {
    let labels = |(model, version, shadow): &(String, u32, u32)| {
        format!("{},shadow_version=\"{shadow}\"", label(model, *version))
    };
    let name = "gantry_registry_shadow_requests_total";
    header(
        out,
        name,
        "counter",
        "Requests mirrored to a shadow version, by outcome: agree, differ, error, dropped (not admitted), no_primary.",
    );
    for (key, s) in shadows {
        for (outcome, n) in &s.outcomes {
            let _ = writeln!(out, "{name}{{{},outcome=\"{outcome}\"}} {n}", labels(key));
        }
    }
    type PerShadow = fn(&ShadowStats) -> &Histogram;
    let histograms: [(&str, &str, PerShadow); 3] = [
        (
            "gantry_registry_shadow_seconds",
            "Shadow generation latency on mirrored requests.",
            |s| &s.shadow_latency,
        ),
        (
            "gantry_registry_shadow_primary_seconds",
            "Primary generation latency on the same mirrored requests (compared ones).",
            |s| &s.primary_latency,
        ),
        (
            "gantry_registry_shadow_first_difference",
            "Token position where a greedy shadow answer first differs from the primary's.",
            |s| &s.first_difference,
        ),
    ];
    for (name, help, get) in histograms {
        header(out, name, "histogram", help);
        for (key, s) in shadows {
            get(s).render(out, name, &labels(key));
        }
    }
}

/// The model cache's gauges and counters, and each loaded engine's batching counters.
fn render_cache(out: &mut String, cache: &ModelCache) {
    let loaded = cache.loaded();
    let gauges = [
        (
            "gantry_registry_models_loaded",
            "Versions loaded for serving.",
            loaded.len() as u64,
        ),
        (
            "gantry_registry_model_cache_bytes",
            "Bytes held by loaded versions (weights and KV caches).",
            loaded.iter().map(|m| m.bytes).sum(),
        ),
        (
            "gantry_registry_model_cache_limit_bytes",
            "The model cache's limit.",
            cache.limit_bytes(),
        ),
    ];
    for (name, help, v) in gauges {
        header(out, name, "gauge", help);
        let _ = writeln!(out, "{name} {v}");
    }
    for (name, help, v) in [
        (
            "gantry_registry_model_loads_total",
            "Versions loaded.",
            cache.loads.load(Ordering::Relaxed),
        ),
        (
            "gantry_registry_model_evictions_total",
            "Versions evicted to stay under the limit.",
            cache.evictions.load(Ordering::Relaxed),
        ),
    ] {
        header(out, name, "counter", help);
        let _ = writeln!(out, "{name} {v}");
    }
    type PerEngine = fn(&crate::serving::engine::EngineStats) -> u64;
    let per_engine: [(&str, &str, PerEngine); 2] = [
        (
            "gantry_registry_decode_steps_total",
            "Batched decode steps per loaded version.",
            |s| s.steps.load(Ordering::Relaxed),
        ),
        (
            "gantry_registry_decoded_sequences_total",
            "Sequences advanced by those steps (divided by the steps: the mean batch size).",
            |s| s.decoded.load(Ordering::Relaxed),
        ),
    ];
    for (name, help, get) in per_engine {
        header(out, name, "counter", help);
        for m in &loaded {
            let _ = writeln!(out, "{name}{{{}}} {}", label(&m.model, m.version), get(&m.engine.stats));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_names_each_version_with_escaped_labels_in_family_order() {
        let m = ServiceMetrics::default();
        m.generation(GenerationOutcome {
            model: "a\"b",
            version: 2,
            outcome: "ok",
            prompt_tokens: 3,
            tokens: 5,
            seconds: 0.2,
            first_token_seconds: Some(0.01),
        });
        m.shadow(ShadowOutcome {
            model: "gpt",
            version: 3,
            shadow_version: 4,
            outcome: "differ",
            shadow_seconds: Some(0.3),
            primary_seconds: Some(0.2),
            first_difference: Some(5),
        });
        m.shadow(ShadowOutcome {
            model: "gpt",
            version: 3,
            shadow_version: 4,
            outcome: "dropped",
            shadow_seconds: None,
            primary_seconds: None,
            first_difference: None,
        });
        let text = m.render(None);
        let lines: Vec<&str> = text.lines().collect();
        for want in [
            "gantry_registry_generate_requests_total{model=\"a\\\"b\",version=\"2\",outcome=\"ok\"} 1",
            "gantry_registry_generate_tokens_total{model=\"a\\\"b\",version=\"2\"} 5",
            "gantry_registry_generate_prompt_tokens_total{model=\"a\\\"b\",version=\"2\"} 3",
            "gantry_registry_generate_seconds_bucket{model=\"a\\\"b\",version=\"2\",le=\"0.25\"} 1",
            "gantry_registry_generate_first_token_seconds_count{model=\"a\\\"b\",version=\"2\"} 1",
            "# TYPE gantry_registry_download_requests_total counter",
            "gantry_registry_shadow_requests_total{model=\"gpt\",version=\"3\",shadow_version=\"4\",outcome=\"differ\"} 1",
            "gantry_registry_shadow_requests_total{model=\"gpt\",version=\"3\",shadow_version=\"4\",outcome=\"dropped\"} 1",
            "gantry_registry_shadow_seconds_count{model=\"gpt\",version=\"3\",shadow_version=\"4\"} 1",
            "gantry_registry_shadow_primary_seconds_sum{model=\"gpt\",version=\"3\",shadow_version=\"4\"} 0.2",
            "gantry_registry_shadow_first_difference_bucket{model=\"gpt\",version=\"3\",shadow_version=\"4\",le=\"4\"} 0",
            "gantry_registry_shadow_first_difference_bucket{model=\"gpt\",version=\"3\",shadow_version=\"4\",le=\"8\"} 1",
        ] {
            assert!(lines.contains(&want), "missing {want:?} in\n{text}");
        }
        let families: Vec<&str> = lines.iter().filter_map(|l| l.strip_prefix("# TYPE ")).collect();
        assert_eq!(
            families,
            [
                "gantry_registry_generate_requests_total counter",
                "gantry_registry_generate_tokens_total counter",
                "gantry_registry_generate_prompt_tokens_total counter",
                "gantry_registry_generate_seconds histogram",
                "gantry_registry_generate_first_token_seconds histogram",
                "gantry_registry_shadow_requests_total counter",
                "gantry_registry_shadow_seconds histogram",
                "gantry_registry_shadow_primary_seconds histogram",
                "gantry_registry_shadow_first_difference histogram",
                "gantry_registry_download_requests_total counter",
            ]
        );
    }
}
