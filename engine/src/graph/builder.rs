//! A small helper to assemble an ONNX `GraphProto`: named initializers, nodes with attributes,
//! typed inputs/outputs; `finish` serializes the model for `commit_from_memory`.
use prost::Message;

use super::proto::*;

/// One attribute value of a node.
pub enum Attr {
    Int(i64),
    Float(f32),
    Ints(Vec<i64>),
}

#[derive(Default)]
pub struct GraphBuilder {
    graph: GraphProto,
    /// Bytes of all initializers (weights the session will hold).
    pub initializer_bytes: u64,
}

fn value_info(name: &str, elem_type: i32, dims: &[Option<i64>]) -> ValueInfoProto {
    let dim = dims
        .iter()
        .enumerate()
        .map(|(i, d)| match d {
            Some(v) => Dimension { dim_value: Some(*v), dim_param: None },
            None => Dimension { dim_value: None, dim_param: Some(format!("{name}_dim{i}")) },
        })
        .collect();
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            tensor_type: Some(TensorTypeProto { elem_type, shape: Some(TensorShapeProto { dim }) }),
        }),
    }
}

impl GraphBuilder {
    pub fn new(name: &str) -> Self {
        Self { graph: GraphProto { name: name.into(), ..Default::default() }, initializer_bytes: 0 }
    }

    /// Graph input; `None` dims are dynamic.
    pub fn input(&mut self, name: &str, elem_type: i32, dims: &[Option<i64>]) {
        self.graph.input.push(value_info(name, elem_type, dims));
    }

    pub fn output(&mut self, name: &str, elem_type: i32, dims: &[Option<i64>]) {
        self.graph.output.push(value_info(name, elem_type, dims));
    }

    fn init_raw(&mut self, name: &str, data_type: i32, dims: &[usize], raw: Vec<u8>) -> String {
        self.initializer_bytes += raw.len() as u64;
        self.graph.initializer.push(TensorProto {
            dims: dims.iter().map(|&d| d as i64).collect(),
            data_type,
            name: name.into(),
            raw_data: raw,
        });
        name.into()
    }

    pub fn init_f32(&mut self, name: &str, dims: &[usize], data: &[f32]) -> String {
        debug_assert_eq!(dims.iter().product::<usize>(), data.len());
        let raw = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.init_raw(name, dtype::FLOAT, dims, raw)
    }

    pub fn init_u8(&mut self, name: &str, dims: &[usize], data: Vec<u8>) -> String {
        debug_assert_eq!(dims.iter().product::<usize>(), data.len());
        self.init_raw(name, dtype::UINT8, dims, data)
    }

    pub fn init_i64(&mut self, name: &str, dims: &[usize], data: &[i64]) -> String {
        let raw = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.init_raw(name, dtype::INT64, dims, raw)
    }

    /// Adds a node; empty strings in `outputs` mark optional outputs left out.
    pub fn node(&mut self, op: &str, domain: &str, name: &str, inputs: &[&str], outputs: &[&str], attrs: Vec<(&str, Attr)>) {
        let attribute = attrs
            .into_iter()
            .map(|(n, a)| match a {
                Attr::Int(i) => AttributeProto { name: n.into(), i, r#type: attr_type::INT, ..Default::default() },
                Attr::Float(f) => AttributeProto { name: n.into(), f, r#type: attr_type::FLOAT, ..Default::default() },
                Attr::Ints(ints) => AttributeProto { name: n.into(), ints, r#type: attr_type::INTS, ..Default::default() },
            })
            .collect();
        self.graph.node.push(NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: outputs.iter().map(|s| s.to_string()).collect(),
            name: name.into(),
            op_type: op.into(),
            attribute,
            domain: domain.into(),
        });
    }

    /// Serializes the model with the given opsets `(domain, version)`.
    pub fn finish(self, opsets: &[(&str, i64)]) -> Vec<u8> {
        let model = ModelProto {
            ir_version: 10,
            opset_import: opsets.iter().map(|(d, v)| OperatorSetIdProto { domain: d.to_string(), version: *v }).collect(),
            producer_name: "fasa".into(),
            producer_version: env!("CARGO_PKG_VERSION").into(),
            graph: Some(self.graph),
        };
        model.encode_to_vec()
    }
}
