//! `{{…}}` templates: step input mappings (`{{input.…}}`, `{{steps.<key>.output.…}}`), agent
//! request templates and template parameters (`{{params.…}}`), parsed and rendered against a
//! JSON scope.
