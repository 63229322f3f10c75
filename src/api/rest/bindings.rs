//! The REST route table, read from the contract: every RPC annotated with `google.api.http`
//! becomes one route. Nothing here is written by hand per endpoint, so REST cannot drift from
//! gRPC.

use prost_reflect::{DescriptorPool, MessageDescriptor, MethodDescriptor, Value as ReflectValue};

/// Where the HTTP body goes in the request message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyMapping {
    /// No body (GET, DELETE).
    None,
    /// The body is the whole request message, less the path fields.
    Whole,
    /// The body is this one field of the request (proto name).
    Field(String),
}

/// One path variable: the name axum matches and the request field it fills.
#[derive(Debug, Clone)]
pub struct PathVariable {
    pub route_name: String,
    /// Proto field names from the request message down, e.g. `["agent", "id"]`.
    pub field_path: Vec<String>,
}

/// One REST route bound to one RPC.
#[derive(Debug, Clone)]
pub struct HttpBinding {
    pub http_method: http::Method,
    /// The template as written in the proto, e.g. `/api/v1/agents/{agent.id}`.
    pub template: String,
    /// The same path in axum syntax with positional names, e.g. `/api/v1/agents/{p0}`.
    pub route_path: String,
    pub path_variables: Vec<PathVariable>,
    pub body: BodyMapping,
    /// The response field that becomes `data` (proto name); `None` means the whole response.
    pub response_body: Option<String>,
    pub success_status: http::StatusCode,
    /// `/turbocat.v1.AgentService/GetAgent`.
    pub grpc_path: String,
    pub input: MessageDescriptor,
    pub output: MessageDescriptor,
    pub server_streaming: bool,
}

/// Every annotated RPC of the pool's `turbocat.*` services.
pub fn http_bindings(pool: &DescriptorPool) -> Result<Vec<HttpBinding>, String> {
    let http_extension = pool
        .get_extension_by_name("google.api.http")
        .ok_or("the descriptor set lacks google.api.http")?;
    let status_extension = pool.get_extension_by_name("turbocat.v1.http_success_status");
    let mut bindings = Vec::new();
    for service in pool.services().filter(|service| service.full_name().starts_with("turbocat.")) {
        for method in service.methods() {
            let options = method.options();
            if !options.has_extension(&http_extension) {
                continue;
            }
            let rule = options.get_extension(&http_extension);
            let ReflectValue::Message(rule) = rule.as_ref() else { continue };
            let success_status = status_extension
                .as_ref()
                .filter(|extension| options.has_extension(extension))
                .and_then(|extension| options.get_extension(extension).as_i32())
                .and_then(|code| u16::try_from(code).ok())
                .and_then(|code| http::StatusCode::from_u16(code).ok())
                .unwrap_or(http::StatusCode::OK);
            bindings.push(binding_from_rule(&method, rule, success_status)?);
        }
    }
    Ok(bindings)
}

fn string_field(message: &prost_reflect::DynamicMessage, name: &str) -> String {
    message
        .get_field_by_name(name)
        .and_then(|value| value.as_str().map(str::to_owned))
        .unwrap_or_default()
}

fn binding_from_rule(
    method: &MethodDescriptor,
    rule: &prost_reflect::DynamicMessage,
    success_status: http::StatusCode,
) -> Result<HttpBinding, String> {
    let mut pattern = None;
    for (name, http_method) in [
        ("get", http::Method::GET),
        ("post", http::Method::POST),
        ("put", http::Method::PUT),
        ("patch", http::Method::PATCH),
        ("delete", http::Method::DELETE),
    ] {
        if rule.has_field_by_name(name) {
            pattern = Some((http_method, string_field(rule, name)));
        }
    }
    let (http_method, template) =
        pattern.ok_or_else(|| format!("{}: unsupported http rule", method.full_name()))?;
    let (route_path, path_variables) = parse_template(&template);
    for variable in &path_variables {
        check_field_path(&method.input(), &variable.field_path)
            .map_err(|problem| format!("{}: {problem}", method.full_name()))?;
    }
    let body = match string_field(rule, "body").as_str() {
        "" => BodyMapping::None,
        "*" => BodyMapping::Whole,
        field => BodyMapping::Field(field.to_owned()),
    };
    let response_body = Some(string_field(rule, "response_body")).filter(|field| !field.is_empty());
    Ok(HttpBinding {
        http_method,
        template,
        route_path,
        path_variables,
        body,
        response_body,
        success_status,
        grpc_path: format!("/{}/{}", method.parent_service().full_name(), method.name()),
        input: method.input(),
        output: method.output(),
        server_streaming: method.is_server_streaming(),
    })
}

/// `/api/v1/agents/{agent.id}/x` -> (`/api/v1/agents/{p0}/x`, [agent.id]).
fn parse_template(template: &str) -> (String, Vec<PathVariable>) {
    let mut route_path = String::new();
    let mut variables = Vec::new();
    let mut rest = template;
    while let Some(start) = rest.find('{') {
        route_path.push_str(&rest[..start]);
        let Some(length) = rest[start..].find('}') else { break };
        let expression = &rest[start + 1..start + length];
        let field = expression.split('=').next().unwrap_or(expression);
        // Positional names: matchit wants one name per position across all routes.
        let route_name = format!("p{}", variables.len());
        route_path.push('{');
        route_path.push_str(&route_name);
        route_path.push('}');
        variables.push(PathVariable {
            route_name,
            field_path: field.split('.').map(str::to_owned).collect(),
        });
        rest = &rest[start + length + 1..];
    }
    route_path.push_str(rest);
    (route_path, variables)
}

fn check_field_path(message: &MessageDescriptor, path: &[String]) -> Result<(), String> {
    let mut current = message.clone();
    for (index, name) in path.iter().enumerate() {
        let field = current.get_field_by_name(name).ok_or_else(|| format!("no field {name}"))?;
        if index + 1 < path.len() {
            let prost_reflect::Kind::Message(next) = field.kind() else {
                return Err(format!("{name} is not a message"));
            };
            current = next;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use prost_reflect::DescriptorPool;

    use super::{BodyMapping, http_bindings};

    fn pool() -> DescriptorPool {
        DescriptorPool::decode(crate::proto::FILE_DESCRIPTOR_SET).expect("pool")
    }

    #[test]
    fn every_rpc_but_the_runner_stream_has_exactly_one_rest_route() {
        let pool = pool();
        let bindings = http_bindings(&pool).expect("bindings");
        let bound: HashSet<String> =
            bindings.iter().map(|binding| binding.grpc_path.clone()).collect();
        assert_eq!(bound.len(), bindings.len(), "one route per rpc");
        let mut unbound = Vec::new();
        for service in
            pool.services().filter(|service| service.full_name().starts_with("turbocat."))
        {
            for method in service.methods() {
                let path = format!("/{}/{}", service.full_name(), method.name());
                if !bound.contains(&path) {
                    unbound.push(path);
                }
            }
        }
        assert_eq!(unbound, vec!["/turbocat.v1.RunnerService/Attach".to_owned()]);
        let routes: HashSet<(String, String)> = bindings
            .iter()
            .map(|binding| (binding.http_method.to_string(), binding.route_path.clone()))
            .collect();
        assert_eq!(routes.len(), bindings.len(), "no two rpcs share a method and path");
    }

    #[test]
    fn success_statuses_bodies_and_paths_come_from_the_contract() {
        let bindings = http_bindings(&pool()).expect("bindings");
        let find = |grpc_path: &str| {
            bindings.iter().find(|binding| binding.grpc_path == grpc_path).expect(grpc_path)
        };
        let register = find("/turbocat.v1.AuthService/Register");
        assert_eq!(register.success_status, 201);
        assert_eq!(register.body, BodyMapping::Whole);
        assert_eq!(find("/turbocat.v1.WorkflowService/ExecuteWorkflow").success_status, 202);
        assert_eq!(find("/turbocat.v1.AuthService/ForgotPassword").success_status, 202);
        let get_agent = find("/turbocat.v1.AgentService/GetAgent");
        assert_eq!(get_agent.success_status, 200);
        assert_eq!(get_agent.body, BodyMapping::None);
        assert_eq!(get_agent.response_body.as_deref(), Some("agent"));
        let update_agent = find("/turbocat.v1.AgentService/UpdateAgent");
        assert_eq!(update_agent.http_method, http::Method::PATCH);
        assert_eq!(update_agent.route_path, "/api/v1/agents/{p0}");
        assert_eq!(update_agent.path_variables[0].field_path, vec!["agent", "id"]);
        assert_eq!(update_agent.body, BodyMapping::Field("agent".into()));
        assert!(find("/turbocat.v1.ExecutionService/WatchExecution").server_streaming);
        for binding in &bindings {
            assert!(
                binding.template.starts_with("/api/v1/"),
                "{} is under /api/v1",
                binding.template
            );
        }
    }
}
