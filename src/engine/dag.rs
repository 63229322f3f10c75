//! Workflow definitions as directed acyclic graphs: validation of saved definitions and the
//! order steps become ready in. Works on plain `DagStep`s (key, dependencies, input mapping),
//! so it knows nothing of the proto or of the store's rows beyond the two conversions below.
//! May call: `crate::mapping` (to parse input mappings) and nothing else.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};

use serde_json::Value;

use crate::error::FieldError;
use crate::mapping::{self, PathSegment, Reference};
use crate::store::{NewWorkflowStep, WorkflowStep};

/// The longest step key.
pub const MAX_STEP_KEY_CHARS: usize = 64;

/// What the graph needs to know about one step.
#[derive(Debug, Clone, PartialEq)]
pub struct DagStep {
    /// Unique within the workflow: `[A-Za-z0-9_-]{1,64}`.
    pub key: String,
    /// Keys of the steps that must succeed first.
    pub depends_on: Vec<String>,
    /// The step's input template; `None` means the execution input.
    pub input_mapping: Option<Value>,
}

impl From<&NewWorkflowStep> for DagStep {
    fn from(step: &NewWorkflowStep) -> Self {
        Self {
            key: step.step_key.clone(),
            depends_on: step.depends_on.clone(),
            input_mapping: step.input_mapping.clone(),
        }
    }
}

impl From<&WorkflowStep> for DagStep {
    fn from(step: &WorkflowStep) -> Self {
        Self {
            key: step.step_key.clone(),
            depends_on: step.depends_on.clone(),
            input_mapping: step.input_mapping.clone(),
        }
    }
}

/// Whether `key` is a valid step key: 1 to 64 of `A-Z a-z 0-9 _ -`.
pub fn is_valid_step_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= MAX_STEP_KEY_CHARS
        && key.bytes().all(|byte| byte.is_ascii_alphanumeric() || byte == b'_' || byte == b'-')
}

fn step_field(index: usize, field: &str) -> String {
    format!("steps[{index}].{field}")
}

/// Every problem of a definition, in step order, each naming the step's field
/// (`steps[2].dependsOn`, `steps[1].inputMapping.url`) and what is wrong. Empty when the steps
/// form a valid DAG whose input mappings only reference the workflow input and the outputs of
/// ancestors.
pub fn validate(steps: &[DagStep]) -> Vec<FieldError> {
    let mut errors = Vec::new();
    let index_of_key = first_index_of_each_key(steps);

    for (index, step) in steps.iter().enumerate() {
        check_key(&mut errors, steps, &index_of_key, index, step);
        check_dependencies(&mut errors, &index_of_key, index, step);
    }
    errors.extend(cycle_errors(steps, &index_of_key));
    for (index, step) in steps.iter().enumerate() {
        if let Some(template) = &step.input_mapping {
            let ancestors = ancestor_keys(steps, &index_of_key, index);
            check_input_mapping(&mut errors, index, step, template, &ancestors, &index_of_key);
        }
    }
    errors.sort_by_key(|error| step_index_of_field(&error.field));
    errors
}

/// The step index a `steps[i]…` field names, for ordering errors by step.
fn step_index_of_field(field: &str) -> usize {
    field
        .strip_prefix("steps[")
        .and_then(|rest| rest.split_once(']'))
        .and_then(|(number, _)| number.parse().ok())
        .unwrap_or(usize::MAX)
}

/// Each key's first position (a repeated key is reported and otherwise ignored).
fn first_index_of_each_key(steps: &[DagStep]) -> HashMap<&str, usize> {
    let mut index_of_key = HashMap::new();
    for (index, step) in steps.iter().enumerate() {
        index_of_key.entry(step.key.as_str()).or_insert(index);
    }
    index_of_key
}

fn check_key(
    errors: &mut Vec<FieldError>,
    steps: &[DagStep],
    index_of_key: &HashMap<&str, usize>,
    index: usize,
    step: &DagStep,
) {
    let field = step_field(index, "key");
    if step.key.is_empty() {
        errors.push(FieldError::new(field, "is required"));
        return;
    }
    if !is_valid_step_key(&step.key) {
        errors.push(FieldError::new(
            field,
            format!("must be 1 to {MAX_STEP_KEY_CHARS} letters, digits, '_' or '-'"),
        ));
        return;
    }
    if let Some(first) =
        index_of_key.get(step.key.as_str()).copied().filter(|first| *first != index)
    {
        debug_assert!(steps[first].key == step.key);
        errors.push(FieldError::new(
            field,
            format!("duplicates the key {:?} of steps[{first}]", step.key),
        ));
    }
}

fn check_dependencies(
    errors: &mut Vec<FieldError>,
    index_of_key: &HashMap<&str, usize>,
    index: usize,
    step: &DagStep,
) {
    let field = step_field(index, "dependsOn");
    let mut seen = HashSet::new();
    for dependency in &step.depends_on {
        if !seen.insert(dependency.as_str()) {
            errors.push(FieldError::new(&field, format!("names {dependency:?} more than once")));
            continue;
        }
        if *dependency == step.key {
            errors.push(FieldError::new(&field, "a step cannot depend on itself"));
            continue;
        }
        if !index_of_key.contains_key(dependency.as_str()) {
            errors.push(FieldError::new(&field, format!("names an unknown step {dependency:?}")));
        }
    }
}

/// The positions of the steps `index` depends on directly, leaving out unknown keys and itself.
fn dependency_indexes(
    index_of_key: &HashMap<&str, usize>,
    index: usize,
    step: &DagStep,
) -> Vec<usize> {
    let mut found: Vec<usize> = step
        .depends_on
        .iter()
        .filter_map(|dependency| index_of_key.get(dependency.as_str()).copied())
        .filter(|dependency_index| *dependency_index != index)
        .collect();
    found.sort_unstable();
    found.dedup();
    found
}

/// One error per cycle (strongly connected component of more than one step), on the
/// `dependsOn` of its first step, naming the steps around the cycle.
fn cycle_errors(steps: &[DagStep], index_of_key: &HashMap<&str, usize>) -> Vec<FieldError> {
    let edges: Vec<Vec<usize>> = steps
        .iter()
        .enumerate()
        .map(|(index, step)| dependency_indexes(index_of_key, index, step))
        .collect();
    let mut errors = Vec::new();
    for component in strongly_connected_components(&edges) {
        if component.len() < 2 {
            continue;
        }
        let members: BTreeSet<usize> = component.iter().copied().collect();
        let Some(start) = members.first().copied() else { continue };
        let path = cycle_through(&edges, &members, start);
        let names: Vec<&str> = path.iter().map(|index| steps[*index].key.as_str()).collect();
        errors.push(FieldError::new(
            step_field(start, "dependsOn"),
            format!("forms a dependency cycle: {}", names.join(" -> ")),
        ));
    }
    errors
}

/// The shortest walk along dependencies from `start` back to `start` inside `members`, as step
/// positions (`start` at both ends).
fn cycle_through(edges: &[Vec<usize>], members: &BTreeSet<usize>, start: usize) -> Vec<usize> {
    let mut previous: HashMap<usize, usize> = HashMap::new();
    let mut queue = VecDeque::from([start]);
    while let Some(current) = queue.pop_front() {
        for next in &edges[current] {
            if !members.contains(next) {
                continue;
            }
            if *next == start {
                let mut path = vec![start, current];
                let mut walker = current;
                while walker != start {
                    walker = previous[&walker];
                    path.push(walker);
                }
                // The walk followed "depends on" edges backwards from `start`, so the path
                // reads in run order: each step runs before the next.
                return path;
            }
            if *next != start && !previous.contains_key(next) {
                previous.insert(*next, current);
                queue.push_back(*next);
            }
        }
    }
    vec![start, start]
}

/// Tarjan's algorithm, iteratively (no recursion depth limit on long chains).
fn strongly_connected_components(edges: &[Vec<usize>]) -> Vec<Vec<usize>> {
    const UNVISITED: usize = usize::MAX;
    let count = edges.len();
    let mut order = vec![UNVISITED; count];
    let mut low_link = vec![0; count];
    let mut on_stack = vec![false; count];
    let mut stack = Vec::new();
    let mut components = Vec::new();
    let mut next_order = 0;
    for root in 0..count {
        if order[root] != UNVISITED {
            continue;
        }
        // (node, position of the next edge to follow)
        let mut work = vec![(root, 0usize)];
        order[root] = next_order;
        low_link[root] = next_order;
        next_order += 1;
        stack.push(root);
        on_stack[root] = true;
        while let Some(top) = work.last_mut() {
            let (node, edge_position) = *top;
            if let Some(&next) = edges[node].get(edge_position) {
                top.1 += 1;
                if order[next] == UNVISITED {
                    order[next] = next_order;
                    low_link[next] = next_order;
                    next_order += 1;
                    stack.push(next);
                    on_stack[next] = true;
                    work.push((next, 0));
                } else if on_stack[next] {
                    low_link[node] = low_link[node].min(order[next]);
                }
                continue;
            }
            work.pop();
            if let Some(&(parent, _)) = work.last() {
                low_link[parent] = low_link[parent].min(low_link[node]);
            }
            if low_link[node] == order[node] {
                let mut component = Vec::new();
                while let Some(member) = stack.pop() {
                    on_stack[member] = false;
                    component.push(member);
                    if member == node {
                        break;
                    }
                }
                components.push(component);
            }
        }
    }
    components
}

/// The keys of every step `index` transitively depends on (itself excluded, cycles allowed).
fn ancestor_keys<'a>(
    steps: &'a [DagStep],
    index_of_key: &HashMap<&str, usize>,
    index: usize,
) -> HashSet<&'a str> {
    let mut visited = HashSet::new();
    let mut pending = dependency_indexes(index_of_key, index, &steps[index]);
    while let Some(current) = pending.pop() {
        if current == index || !visited.insert(current) {
            continue;
        }
        pending.extend(dependency_indexes(index_of_key, current, &steps[current]));
    }
    visited.into_iter().map(|ancestor| steps[ancestor].key.as_str()).collect()
}

/// The field of a location inside a step's input mapping: `steps[1].inputMapping.url`.
fn mapping_field(index: usize, location: &str) -> String {
    let base = step_field(index, "inputMapping");
    if location.is_empty() {
        base
    } else if location.starts_with('[') {
        format!("{base}{location}")
    } else {
        format!("{base}.{location}")
    }
}

fn check_input_mapping(
    errors: &mut Vec<FieldError>,
    index: usize,
    step: &DagStep,
    template: &Value,
    ancestors: &HashSet<&str>,
    index_of_key: &HashMap<&str, usize>,
) {
    let references = match mapping::references(template) {
        Ok(references) => references,
        Err(error) => {
            errors.push(FieldError::new(mapping_field(index, &error.location), error.message));
            return;
        }
    };
    for (location, reference) in references {
        if let Err(message) = check_reference(&reference, step, ancestors, index_of_key) {
            errors.push(FieldError::new(mapping_field(index, &location), message));
        }
    }
}

/// The text of a path segment as a step key (`steps.1.output` parses `1` as an index).
fn segment_text(segment: Option<&PathSegment>) -> Option<String> {
    match segment? {
        PathSegment::Key(key) => Some(key.clone()),
        PathSegment::Index(position) => Some(position.to_string()),
    }
}

/// Whether one `{{…}}` reference may appear in `step`'s input mapping: `input…`, or
/// `steps.<ancestor>.output…`.
fn check_reference(
    reference: &Reference,
    step: &DagStep,
    ancestors: &HashSet<&str>,
    index_of_key: &HashMap<&str, usize>,
) -> Result<(), String> {
    let text = &reference.text;
    match reference.root() {
        Some("input") => Ok(()),
        Some("steps") => {
            let Some(key) = segment_text(reference.segments.get(1)) else {
                return Err(format!("{{{{{text}}}}} must name a step: steps.<key>.output"));
            };
            if reference.key_at(2) != Some("output") {
                return Err(format!(
                    "{{{{{text}}}}} must read a step's output: steps.{key}.output…"
                ));
            }
            if key == step.key {
                return Err(format!("{{{{{text}}}}} refers to the step's own output"));
            }
            if !index_of_key.contains_key(key.as_str()) {
                return Err(format!("{{{{{text}}}}} refers to an unknown step {key:?}"));
            }
            if !ancestors.contains(key.as_str()) {
                return Err(format!(
                    "{{{{{text}}}}} refers to step {key:?}, which this step does not depend on \
                     (add it to dependsOn)"
                ));
            }
            Ok(())
        }
        _ => Err(format!(
            "{{{{{text}}}}} has an unknown root: only input… and steps.<key>.output… are allowed"
        )),
    }
}

/// The steps in an order where every step comes after all its dependencies; among steps that
/// are ready together, definition order. `None` when the steps do not form a valid DAG
/// (a cycle, an unknown dependency or a repeated key).
pub fn topological_order(steps: &[DagStep]) -> Option<Vec<usize>> {
    let index_of_key = first_index_of_each_key(steps);
    if index_of_key.len() != steps.len() {
        return None;
    }
    let mut waiting_on = Vec::with_capacity(steps.len());
    let mut dependents: Vec<Vec<usize>> = vec![Vec::new(); steps.len()];
    for (index, step) in steps.iter().enumerate() {
        let mut dependencies = BTreeSet::new();
        for dependency in &step.depends_on {
            let dependency_index = *index_of_key.get(dependency.as_str())?;
            if dependency_index == index {
                return None;
            }
            dependencies.insert(dependency_index);
        }
        for dependency_index in &dependencies {
            dependents[*dependency_index].push(index);
        }
        waiting_on.push(dependencies.len());
    }
    let mut ready: BTreeSet<usize> =
        (0..steps.len()).filter(|index| waiting_on[*index] == 0).collect();
    let mut order = Vec::with_capacity(steps.len());
    while let Some(next) = ready.pop_first() {
        order.push(next);
        for dependent in &dependents[next] {
            waiting_on[*dependent] -= 1;
            if waiting_on[*dependent] == 0 {
                ready.insert(*dependent);
            }
        }
    }
    (order.len() == steps.len()).then_some(order)
}

/// The steps that may start now: not in `succeeded` themselves and every dependency in it, in
/// definition order. The engine leaves out the ones it already started.
pub fn ready_steps<'a>(steps: &'a [DagStep], succeeded: &HashSet<&str>) -> Vec<&'a DagStep> {
    steps
        .iter()
        .filter(|step| !succeeded.contains(step.key.as_str()))
        .filter(|step| {
            step.depends_on.iter().all(|dependency| succeeded.contains(dependency.as_str()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn step(key: &str, depends_on: &[&str]) -> DagStep {
        DagStep {
            key: key.to_owned(),
            depends_on: depends_on.iter().map(|key| (*key).to_owned()).collect(),
            input_mapping: None,
        }
    }

    fn with_mapping(mut step: DagStep, mapping: Value) -> DagStep {
        step.input_mapping = Some(mapping);
        step
    }

    fn fields(errors: &[FieldError]) -> Vec<&str> {
        errors.iter().map(|error| error.field.as_str()).collect()
    }

    #[test]
    fn a_valid_diamond_passes_and_orders_dependencies_first() {
        let steps = vec![
            step("fetch", &[]),
            with_mapping(step("left", &["fetch"]), json!({"data": "{{steps.fetch.output.items}}"})),
            with_mapping(step("right", &["fetch"]), json!("{{input.name}}")),
            with_mapping(
                step("join", &["right", "left"]),
                json!({"a": "{{steps.left.output}}", "b": "x {{steps.fetch.output.id}}"}),
            ),
        ];
        assert_eq!(validate(&steps), Vec::new());
        assert_eq!(topological_order(&steps), Some(vec![0, 1, 2, 3]));
        let reversed: Vec<DagStep> = steps.iter().rev().cloned().collect();
        assert_eq!(topological_order(&reversed), Some(vec![3, 1, 2, 0]));
    }

    #[test]
    fn duplicate_keys_are_reported_on_the_later_step() {
        let errors = validate(&[step("a", &[]), step("b", &[]), step("a", &[])]);
        assert_eq!(fields(&errors), vec!["steps[2].key"]);
        assert!(errors[0].message.contains("steps[0]"), "{errors:?}");
        assert_eq!(topological_order(&[step("a", &[]), step("a", &[])]), None);
    }

    #[test]
    fn unknown_and_repeated_dependencies_are_reported() {
        let errors = validate(&[step("a", &[]), step("b", &["a", "ghost", "a"])]);
        assert_eq!(fields(&errors), vec!["steps[1].dependsOn", "steps[1].dependsOn"]);
        assert!(errors.iter().any(|error| error.message.contains("\"ghost\"")), "{errors:?}");
        assert!(errors.iter().any(|error| error.message.contains("more than once")));
        assert_eq!(topological_order(&[step("b", &["ghost"])]), None);
    }

    #[test]
    fn a_step_depending_on_itself_is_reported_once() {
        let errors = validate(&[step("a", &[]), step("loop", &["loop"])]);
        assert_eq!(fields(&errors), vec!["steps[1].dependsOn"]);
        assert!(errors[0].message.contains("itself"), "{errors:?}");
        assert_eq!(topological_order(&[step("loop", &["loop"])]), None);
    }

    #[test]
    fn cycles_name_their_steps() {
        let steps = vec![
            step("start", &[]),
            step("a", &["start", "c"]),
            step("b", &["a"]),
            step("c", &["b"]),
            step("x", &["y"]),
            step("y", &["x"]),
        ];
        let errors = validate(&steps);
        assert_eq!(fields(&errors), vec!["steps[1].dependsOn", "steps[4].dependsOn"]);
        assert_eq!(errors[0].message, "forms a dependency cycle: a -> b -> c -> a");
        assert_eq!(errors[1].message, "forms a dependency cycle: x -> y -> x");
        assert_eq!(topological_order(&steps), None);
    }

    #[test]
    fn references_must_point_at_ancestors() {
        let steps = vec![
            step("a", &[]),
            step("b", &["a"]),
            step("side", &[]),
            with_mapping(
                step("c", &["b"]),
                json!({
                    "fromGrandparent": "{{steps.a.output}}",
                    "fromSibling": "{{steps.side.output.x}}",
                    "fromMissing": "{{steps.nope.output}}",
                    "fromSelf": "{{steps.c.output}}",
                    "list": ["ok", "{{ steps.side.output }}"]
                }),
            ),
        ];
        let errors = validate(&steps);
        let mut found = fields(&errors);
        found.sort_unstable();
        assert_eq!(
            found,
            vec![
                "steps[3].inputMapping.fromMissing",
                "steps[3].inputMapping.fromSelf",
                "steps[3].inputMapping.fromSibling",
                "steps[3].inputMapping.list[1]",
            ],
            "{errors:?}"
        );
        let sibling = errors
            .iter()
            .find(|error| error.field == "steps[3].inputMapping.fromSibling")
            .expect("sibling error");
        assert!(sibling.message.contains("\"side\""), "{sibling:?}");
    }

    #[test]
    fn unknown_roots_and_partial_step_paths_are_refused() {
        let steps = vec![
            step("a", &[]),
            with_mapping(
                step("b", &["a"]),
                json!({
                    "env": "{{env.HOME}}",
                    "params": "{{params.x}}",
                    "bare": "{{steps}}",
                    "noOutput": "{{steps.a.input}}",
                    "good": "{{steps.a.output}}",
                    "whole": "{{input}}"
                }),
            ),
        ];
        let errors = validate(&steps);
        let mut found = fields(&errors);
        found.sort_unstable();
        assert_eq!(
            found,
            vec![
                "steps[1].inputMapping.bare",
                "steps[1].inputMapping.env",
                "steps[1].inputMapping.noOutput",
                "steps[1].inputMapping.params",
            ],
            "{errors:?}"
        );
    }

    #[test]
    fn malformed_templates_are_reported_where_they_are() {
        let steps = vec![
            with_mapping(step("a", &[]), json!({"url": "https://x/{{input.id"})),
            with_mapping(step("b", &[]), json!("{{}}")),
        ];
        let errors = validate(&steps);
        assert_eq!(fields(&errors), vec!["steps[0].inputMapping.url", "steps[1].inputMapping"]);
    }

    #[test]
    fn step_keys_follow_the_syntax() {
        let long = "k".repeat(MAX_STEP_KEY_CHARS + 1);
        let steps = vec![
            step("ok_key-1", &[]),
            step("", &[]),
            step("has space", &[]),
            step("dot.ted", &[]),
            step(&long, &[]),
            step(&"k".repeat(MAX_STEP_KEY_CHARS), &[]),
        ];
        let errors = validate(&steps);
        assert_eq!(
            fields(&errors),
            vec!["steps[1].key", "steps[2].key", "steps[3].key", "steps[4].key"]
        );
        assert_eq!(errors[0].message, "is required");
    }

    #[test]
    fn every_problem_is_reported_at_once_in_step_order() {
        let steps = vec![
            with_mapping(step("a", &["b"]), json!("{{steps.z.output}}")),
            step("b", &["a"]),
            step("a", &["missing"]),
        ];
        let errors = validate(&steps);
        assert_eq!(
            fields(&errors),
            vec![
                "steps[0].dependsOn",
                "steps[0].inputMapping",
                "steps[2].key",
                "steps[2].dependsOn"
            ],
            "{errors:?}"
        );
    }

    #[test]
    fn ready_steps_follow_the_succeeded_set() {
        let steps = vec![step("a", &[]), step("b", &[]), step("c", &["a", "b"]), step("d", &["c"])];
        let keys = |ready: Vec<&DagStep>| -> Vec<String> {
            ready.into_iter().map(|step| step.key.clone()).collect()
        };
        assert_eq!(keys(ready_steps(&steps, &HashSet::new())), vec!["a", "b"]);
        assert_eq!(keys(ready_steps(&steps, &HashSet::from(["a"]))), vec!["b"]);
        assert_eq!(keys(ready_steps(&steps, &HashSet::from(["a", "b"]))), vec!["c"]);
        assert_eq!(keys(ready_steps(&steps, &HashSet::from(["a", "b", "c"]))), vec!["d"]);
        assert!(ready_steps(&steps, &HashSet::from(["a", "b", "c", "d"])).is_empty());
        assert_eq!(topological_order(&steps), Some(vec![0, 1, 2, 3]));
    }

    #[test]
    fn long_chains_do_not_overflow_and_numeric_keys_resolve() {
        let mut steps = vec![step("0", &[])];
        for position in 1..5_000 {
            let previous = (position - 1).to_string();
            steps.push(step(&position.to_string(), &[previous.as_str()]));
        }
        steps[1].input_mapping = Some(json!("{{steps.0.output}}"));
        assert_eq!(validate(&steps), Vec::new());
        assert_eq!(topological_order(&steps).map(|order| order.len()), Some(5_000));
    }
}

/// Properties over generated step lists: validation never panics and reports fields of the
/// steps it was given; a definition that validates has a topological order; a graph built
/// acyclic validates, one with a back edge does not; running ready steps wave by wave runs
/// each step once, after its dependencies.
#[cfg(test)]
mod properties {
    use std::collections::{HashMap, HashSet};

    use proptest::prelude::*;
    use serde_json::json;

    use super::*;

    fn step(key: String, depends_on: Vec<String>) -> DagStep {
        DagStep { key, depends_on, input_mapping: None }
    }

    /// Steps whose keys and dependencies come from a small pool (so repeats, unknown names,
    /// self-references and cycles are common), a few with a mapping that reads another step.
    fn any_steps() -> impl Strategy<Value = Vec<DagStep>> {
        let name = prop_oneof![
            4 => "[a-e]",
            1 => Just(String::new()),
            1 => "[a-e ][.x]",
        ];
        let mapping = proptest::option::of((name.clone(), "[a-z]{0,3}", any::<bool>()));
        proptest::collection::vec(
            (name.clone(), proptest::collection::vec(name, 0..4), mapping),
            0..8,
        )
        .prop_map(|steps| {
            steps
                .into_iter()
                .map(|(key, depends_on, mapping)| DagStep {
                    key,
                    depends_on,
                    input_mapping: mapping.map(|(target, field, whole)| {
                        let reference = format!("{{{{steps.{target}.output.{field}}}}}");
                        if whole {
                            json!(reference)
                        } else {
                            json!({ "v": format!("x {reference}") })
                        }
                    }),
                })
                .collect()
        })
    }

    /// An acyclic graph: step `i` depends only on steps before it; then the list is shuffled,
    /// so definition order is not run order.
    fn acyclic_steps() -> impl Strategy<Value = Vec<DagStep>> {
        (1usize..12)
            .prop_flat_map(|count| {
                let dependencies = (0..count)
                    .map(|index| {
                        proptest::sample::subsequence(
                            (0..index).collect::<Vec<_>>(),
                            0..=index.min(3),
                        )
                    })
                    .collect::<Vec<_>>();
                (dependencies, Just((0..count).collect::<Vec<usize>>()).prop_shuffle())
            })
            .prop_map(|(dependencies, order)| {
                let named = |index: usize| format!("s{index}");
                let steps: Vec<DagStep> = dependencies
                    .into_iter()
                    .enumerate()
                    .map(|(index, depends)| {
                        step(named(index), depends.into_iter().map(named).collect())
                    })
                    .collect();
                order.into_iter().map(|index| steps[index].clone()).collect()
            })
    }

    /// Whether `order` lists every step once, each after all its dependencies.
    fn respects_dependencies(steps: &[DagStep], order: &[usize]) -> bool {
        let mut position = HashMap::new();
        for (at, index) in order.iter().enumerate() {
            if position.insert(steps[*index].key.as_str(), at).is_some() {
                return false;
            }
        }
        position.len() == steps.len()
            && order.iter().enumerate().all(|(at, index)| {
                steps[*index].depends_on.iter().all(|dependency| position[dependency.as_str()] < at)
            })
    }

    proptest! {
        #[test]
        fn any_definition_is_judged_without_panicking(steps in any_steps()) {
            let errors = validate(&steps);
            for error in &errors {
                let index = step_index_of_field(&error.field);
                prop_assert!(index < steps.len(), "{error:?} names a step that exists");
                prop_assert!(!error.message.is_empty());
            }
            // A definition that validates has an order; any order found respects every edge.
            match topological_order(&steps) {
                Some(order) => prop_assert!(respects_dependencies(&steps, &order)),
                None => prop_assert!(!errors.is_empty(), "no order, so something is reported"),
            }
        }

        #[test]
        fn an_acyclic_graph_validates_and_runs_wave_by_wave(steps in acyclic_steps()) {
            prop_assert_eq!(validate(&steps), Vec::new());
            let order = topological_order(&steps).expect("acyclic");
            prop_assert!(respects_dependencies(&steps, &order));
            let mut succeeded: HashSet<&str> = HashSet::new();
            for _ in 0..steps.len() {
                let ready = ready_steps(&steps, &succeeded);
                if ready.is_empty() {
                    break;
                }
                for ready_step in &ready {
                    prop_assert!(ready_step.depends_on.iter().all(|dependency| succeeded.contains(dependency.as_str())));
                }
                succeeded.extend(ready.iter().map(|ready_step| ready_step.key.as_str()));
            }
            prop_assert_eq!(succeeded.len(), steps.len(), "every step ran");
        }

        #[test]
        fn a_back_edge_is_reported_as_a_cycle(steps in acyclic_steps(), pick in any::<proptest::sample::Index>()) {
            let order = topological_order(&steps).expect("acyclic");
            // A step with a dependency, and one of its ancestors made to depend on it.
            let Some(late) = order.iter().rev().copied().find(|index| !steps[*index].depends_on.is_empty()) else {
                return Ok(());
            };
            let mut cyclic = steps.clone();
            let dependency = pick.get(&steps[late].depends_on).clone();
            let dependency_index = steps.iter().position(|candidate| candidate.key == dependency).expect("known");
            cyclic[dependency_index].depends_on.push(steps[late].key.clone());
            prop_assert_eq!(topological_order(&cyclic), None);
            let errors = validate(&cyclic);
            prop_assert!(
                errors.iter().any(|error| error.message.starts_with("forms a dependency cycle")
                    && error.message.contains(&steps[late].key)
                    && error.message.contains(&dependency)),
                "{errors:?}"
            );
        }
    }
}
