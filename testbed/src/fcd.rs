//! SUMO floating car data (FCD) traces: `sumo --fcd-output`, the format vehicular researchers
//! already have: `<fcd-export><timestep time=".."><vehicle id x y speed angle .../></timestep>`.
//! A small strict reader (no XML crate): comments, the `<?xml?>` declaration and unknown
//! attributes are skipped; anything malformed is an error naming its line.

use std::collections::BTreeMap;

/// One vehicle at one timestep.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FcdSample {
    pub time_s: f64,
    pub x: f64,
    pub y: f64,
    /// m/s.
    pub speed_mps: f64,
    /// Degrees, SUMO's convention (0 = north, clockwise).
    pub angle_deg: f64,
}

/// A trace: samples per vehicle id, in time order.
pub type FcdTrace = BTreeMap<String, Vec<FcdSample>>;

/// A malformed FCD file.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("FCD line {line}: {problem}")]
pub struct FcdError {
    pub line: usize,
    pub problem: String,
}

/// Limits on what is read, so that a huge or hostile file fails cleanly.
pub const MAX_FCD_VEHICLES: usize = 10_000;
/// Samples across all vehicles.
pub const MAX_FCD_SAMPLES: usize = 10_000_000;

struct Tag<'a> {
    name: &'a str,
    closing: bool,
    self_closing: bool,
    attrs: Vec<(&'a str, String)>,
    line: usize,
}

fn line_of(text: &str, at: usize) -> usize {
    text[..at].bytes().filter(|b| *b == b'\n').count() + 1
}

fn unescape(v: &str) -> String {
    v.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&apos;", "'")
        .replace("&amp;", "&")
}

fn parse_tag<'a>(body: &'a str, line: usize) -> Result<Tag<'a>, FcdError> {
    let err = |problem: String| FcdError { line, problem };
    let (closing, body) = match body.strip_prefix('/') {
        Some(b) => (true, b),
        None => (false, body),
    };
    let (self_closing, body) = match body.strip_suffix('/') {
        Some(b) => (true, b),
        None => (false, body),
    };
    let body = body.trim();
    let name_end = body.find(char::is_whitespace).unwrap_or(body.len());
    let name = &body[..name_end];
    if name.is_empty() {
        return Err(err("empty tag".into()));
    }
    let mut rest = body[name_end..].trim_start();
    let mut attrs = Vec::new();
    while !rest.is_empty() {
        let eq = rest
            .find('=')
            .ok_or_else(|| err(format!("<{name}>: attribute without `=` near {rest:?}")))?;
        let key = rest[..eq].trim();
        let after = rest[eq + 1..].trim_start();
        let quote = after
            .chars()
            .next()
            .filter(|c| *c == '"' || *c == '\'')
            .ok_or_else(|| err(format!("<{name}>: attribute {key} is not quoted")))?;
        let close = after[1..]
            .find(quote)
            .ok_or_else(|| err(format!("<{name}>: attribute {key} has no closing quote")))?;
        attrs.push((key, unescape(&after[1..1 + close])));
        rest = after[close + 2..].trim_start();
    }
    Ok(Tag { name, closing, self_closing, attrs, line })
}

fn number(tag: &Tag<'_>, key: &str) -> Result<f64, FcdError> {
    let v = tag.attrs.iter().find(|(k, _)| *k == key).map(|(_, v)| v).ok_or_else(|| FcdError {
        line: tag.line,
        problem: format!("<{}> has no {key} attribute", tag.name),
    })?;
    v.trim().parse::<f64>().ok().filter(|x| x.is_finite()).ok_or_else(|| FcdError {
        line: tag.line,
        problem: format!("<{}> {key}={v:?} is not a number", tag.name),
    })
}

/// Parses a whole FCD file.
pub fn parse(text: &str) -> Result<FcdTrace, FcdError> {
    let mut trace = FcdTrace::new();
    let mut samples = 0usize;
    let mut in_root = false;
    let mut seen_root = false;
    let mut closed_root = false;
    let mut timestep: Option<(f64, usize)> = None;
    let mut last_time = f64::NEG_INFINITY;
    let mut i = 0;
    while let Some(off) = text[i..].find('<') {
        let start = i + off;
        let line = line_of(text, start);
        let between = text[i..start].trim();
        if !between.is_empty() {
            let at = i + (text[i..start].len() - text[i..start].trim_start().len());
            return Err(FcdError {
                line: line_of(text, at),
                problem: format!("unexpected text {between:?}"),
            });
        }
        let rest = &text[start..];
        let (skip_to, tag_body) = if rest.starts_with("<!--") {
            let end = rest
                .find("-->")
                .ok_or(FcdError { line, problem: "unterminated comment".into() })?;
            (start + end + 3, None)
        } else if rest.starts_with("<?") {
            let end =
                rest.find("?>").ok_or(FcdError { line, problem: "unterminated <? ?>".into() })?;
            (start + end + 2, None)
        } else {
            let end =
                rest.find('>').ok_or(FcdError { line, problem: "unterminated tag".into() })?;
            (start + end + 1, Some(&rest[1..end]))
        };
        i = skip_to;
        let Some(body) = tag_body else { continue };
        let tag = parse_tag(body, line)?;
        let err = |problem: String| FcdError { line, problem };
        if closed_root {
            return Err(err(format!("<{}> after </fcd-export>", tag.name)));
        }
        match (tag.name, tag.closing) {
            ("fcd-export", false) => {
                if seen_root {
                    return Err(err("a second <fcd-export>".into()));
                }
                seen_root = true;
                in_root = !tag.self_closing;
                closed_root = tag.self_closing;
            }
            ("fcd-export", true) => {
                if !in_root || timestep.is_some() {
                    return Err(err(
                        "</fcd-export> without an open <fcd-export> or with an open <timestep>"
                            .into(),
                    ));
                }
                in_root = false;
                closed_root = true;
            }
            ("timestep", false) => {
                if !in_root {
                    return Err(err("<timestep> outside <fcd-export>".into()));
                }
                if let Some((_, l)) = timestep {
                    return Err(err(format!("<timestep> inside the <timestep> of line {l}")));
                }
                let t = number(&tag, "time")?;
                if t < last_time {
                    return Err(err(format!("time {t} goes back (previous {last_time})")));
                }
                last_time = t;
                if !tag.self_closing {
                    timestep = Some((t, line));
                }
            }
            ("timestep", true) => {
                timestep.take().ok_or_else(|| err("</timestep> without <timestep>".into()))?;
            }
            ("vehicle", false) => {
                let Some((time_s, _)) = timestep else {
                    return Err(err("<vehicle> outside a <timestep>".into()));
                };
                if !tag.self_closing {
                    return Err(err("<vehicle> must be self-closing (`<vehicle .../>`)".into()));
                }
                let id = tag.attrs.iter().find(|(k, _)| *k == "id").map(|(_, v)| v.clone());
                let id = id
                    .filter(|s| !s.is_empty())
                    .ok_or_else(|| err("<vehicle> has no id".into()))?;
                let sample = FcdSample {
                    time_s,
                    x: number(&tag, "x")?,
                    y: number(&tag, "y")?,
                    speed_mps: number(&tag, "speed")?,
                    angle_deg: number(&tag, "angle").unwrap_or(0.0),
                };
                if sample.speed_mps < 0.0 {
                    return Err(err(format!("vehicle {id}: negative speed {}", sample.speed_mps)));
                }
                if !trace.contains_key(&id) && trace.len() >= MAX_FCD_VEHICLES {
                    return Err(err(format!(
                        "more than {MAX_FCD_VEHICLES} vehicles (MAX_FCD_VEHICLES)"
                    )));
                }
                samples += 1;
                if samples > MAX_FCD_SAMPLES {
                    return Err(err(format!(
                        "more than {MAX_FCD_SAMPLES} samples (MAX_FCD_SAMPLES)"
                    )));
                }
                trace.entry(id).or_default().push(sample);
            }
            (other, _) if !in_root && !seen_root => {
                return Err(err(format!("<{other}> before <fcd-export>: not an FCD file")));
            }
            // Other SUMO elements (person, container...) carry nothing we use.
            _ => {}
        }
    }
    let tail = text[i..].trim();
    if !tail.is_empty() {
        let at = i + (text[i..].len() - text[i..].trim_start().len());
        return Err(FcdError {
            line: line_of(text, at),
            problem: format!("unexpected text {tail:?}"),
        });
    }
    let end = line_of(text, text.len());
    if !seen_root {
        return Err(FcdError { line: end, problem: "no <fcd-export> element".into() });
    }
    if !closed_root {
        return Err(FcdError {
            line: end,
            problem: "missing </fcd-export> (truncated file?)".into(),
        });
    }
    Ok(trace)
}

/// A vehicle's samples as distance travelled along its path (starting at its first x), with
/// its speed: the road is unrolled into the straight road the RSUs are placed on.
pub fn along_road(samples: &[FcdSample]) -> Vec<(f64, f64, f64)> {
    let mut out = Vec::with_capacity(samples.len());
    let mut dist = samples.first().map_or(0.0, |s| s.x);
    let mut prev: Option<&FcdSample> = None;
    for s in samples {
        if let Some(p) = prev {
            dist += ((s.x - p.x).powi(2) + (s.y - p.y).powi(2)).sqrt();
        }
        out.push((s.time_s, dist, s.speed_mps));
        prev = Some(s);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimal_file() {
        let t = parse(
            "<?xml version=\"1.0\"?>\n<!-- a <comment> -->\n<fcd-export>\n<timestep time=\"0.00\">\n\
             <vehicle id=\"a\" x=\"1\" y=\"2\" speed=\"3\" angle=\"90\"/>\n</timestep>\n\
             <timestep time=\"1.00\"/>\n</fcd-export>\n",
        )
        .unwrap();
        assert_eq!(
            t["a"],
            vec![FcdSample { time_s: 0.0, x: 1.0, y: 2.0, speed_mps: 3.0, angle_deg: 90.0 }]
        );
    }

    #[test]
    fn malformed_files_name_the_line() {
        let cases = [
            ("<fcd-export>\n<timestep time=\"0\">\n<vehicle id=\"a\" x=\"1\" speed=\"3\"/>\n</timestep>\n</fcd-export>", 3, "no y"),
            ("<fcd-export>\n<timestep time=\"0\">\n<vehicle id=\"a\" x=\"one\" y=\"0\" speed=\"3\"/>\n</timestep>\n</fcd-export>", 3, "not a number"),
            ("<fcd-export>\n<vehicle id=\"a\" x=\"1\" y=\"0\" speed=\"3\"/>\n</fcd-export>", 2, "outside a <timestep>"),
            ("<fcd-export>\n<timestep time=\"5\"/>\n<timestep time=\"4\"/>\n</fcd-export>", 3, "goes back"),
            ("<fcd-export>\n<timestep time=\"0\">\n", 3, "missing </fcd-export>"),
            ("<fcd-export>\n<timestep time=\"0\">\n<vehicle id=\"a\" x=\"1\n", 3, "unterminated tag"),
            ("<routes>\n</routes>\n", 1, "not an FCD file"),
            ("", 1, "no <fcd-export>"),
            ("<fcd-export>\n<timestep time=0/>\n</fcd-export>", 2, "not quoted"),
            ("<fcd-export>\n<timestep time=\"0\">\n<vehicle x=\"1\" y=\"0\" speed=\"3\"/>\n</timestep>\n</fcd-export>", 3, "no id"),
            ("<fcd-export>\ngarbage\n</fcd-export>", 2, "unexpected text"),
            ("<fcd-export>\n</fcd-export>\n<timestep time=\"0\"/>", 3, "after </fcd-export>"),
        ];
        for (text, line, want) in cases {
            let e = parse(text).unwrap_err();
            assert_eq!(e.line, line, "{text:?}: {e}");
            assert!(e.problem.contains(want), "{text:?}: {e}");
        }
    }

    #[test]
    fn along_road_unrolls_the_path() {
        let s =
            |t: f64, x: f64, y: f64| FcdSample { time_s: t, x, y, speed_mps: 5.0, angle_deg: 0.0 };
        let r = along_road(&[s(0.0, 10.0, 0.0), s(1.0, 13.0, 4.0), s(2.0, 13.0, 9.0)]);
        assert_eq!(r, vec![(0.0, 10.0, 5.0), (1.0, 15.0, 5.0), (2.0, 20.0, 5.0)]);
    }
}
