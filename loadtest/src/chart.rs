//! A time series as an SVG chart: panels stacked over one time axis, each with its own lines,
//! and vertical marks (phase changes, stages) across every panel.

use std::path::Path;

use plotters::prelude::*;

/// One line of a panel.
pub struct Line {
    pub name: String,
    pub colour: RGBColor,
    pub points: Vec<(f64, f64)>,
}

/// One panel: a title, a y-axis label and its lines.
pub struct Panel {
    pub title: String,
    pub y_label: String,
    pub lines: Vec<Line>,
}

/// A vertical line at `t` seconds with a short label.
pub struct Mark {
    pub t: f64,
    pub label: String,
}

pub const BLUE: RGBColor = RGBColor(31, 119, 180);
pub const GREEN: RGBColor = RGBColor(44, 160, 44);
pub const GREY: RGBColor = RGBColor(90, 90, 90);
pub const ORANGE: RGBColor = RGBColor(255, 127, 14);

const WIDTH: u32 = 960;
const PANEL_HEIGHT: u32 = 260;

/// Writes `panels` over `0..=t_max` seconds to `path`.
pub fn write_svg(
    path: &Path,
    title: &str,
    panels: &[Panel],
    marks: &[Mark],
    t_max: f64,
) -> anyhow::Result<()> {
    let height = 40 + PANEL_HEIGHT * panels.len() as u32;
    let root = SVGBackend::new(path, (WIDTH, height)).into_drawing_area();
    root.fill(&WHITE).map_err(draw_error)?;
    let root = root.titled(title, ("sans-serif", 20)).map_err(draw_error)?;
    let areas = root.split_evenly((panels.len().max(1), 1));
    for (panel, area) in panels.iter().zip(&areas) {
        draw_panel(area, panel, marks, t_max.max(1.0))?;
    }
    root.present().map_err(draw_error)?;
    Ok(())
}

fn draw_panel(
    area: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
    panel: &Panel,
    marks: &[Mark],
    t_max: f64,
) -> anyhow::Result<()> {
    let y_max = panel
        .lines
        .iter()
        .flat_map(|l| l.points.iter().map(|p| p.1))
        .fold(0.0_f64, f64::max);
    let y_max = if y_max > 0.0 { y_max * 1.15 } else { 1.0 };
    let mut chart = ChartBuilder::on(area)
        .caption(&panel.title, ("sans-serif", 15))
        .margin(8)
        .x_label_area_size(30)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..t_max, 0.0..y_max)
        .map_err(draw_error)?;
    chart
        .configure_mesh()
        .x_desc("seconds")
        .y_desc(panel.y_label.as_str())
        .light_line_style(RGBColor(235, 235, 235))
        .draw()
        .map_err(draw_error)?;
    for mark in marks {
        chart
            .draw_series(std::iter::once(PathElement::new(
                vec![(mark.t, 0.0), (mark.t, y_max)],
                GREY.mix(0.6),
            )))
            .map_err(draw_error)?;
        chart
            .draw_series(std::iter::once(Text::new(
                mark.label.clone(),
                (mark.t + t_max * 0.004, y_max * 0.97),
                ("sans-serif", 11).into_font().color(&GREY),
            )))
            .map_err(draw_error)?;
    }
    for line in &panel.lines {
        let colour = line.colour;
        chart
            .draw_series(LineSeries::new(
                line.points.iter().copied(),
                colour.stroke_width(2),
            ))
            .map_err(draw_error)?
            .label(line.name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], colour));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK.mix(0.3))
        .draw()
        .map_err(draw_error)?;
    Ok(())
}

fn draw_error<E: std::fmt::Display>(error: E) -> anyhow::Error {
    anyhow::anyhow!("cannot draw the chart: {error}")
}
